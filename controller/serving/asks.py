"""An `Ask`: any valid request (generation, edit, upscale) in the one shape the router serves.

Each endpoint's parser checks its own body; this turns the result into the
route it goes to, the jobs each model runs, and the parameters recorded with it.
Routing by request kind happens here and nowhere else: generations go to
`thumbnail` when its match rule takes them, else `generate`; edits with a mask
go to `inpaint` when there is one, else `edit`; upscales go to `upscale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.config import Config, MatchRule, Route
from controller.serving.api import BadRequest, ImagesRequest
from controller.serving.uploads import EditFields, Upload
from workers.jobs import ImageJob

ENDPOINT_OF = {
    Route.GENERATE: "/v1/images/generations",
    Route.THUMBNAIL: "/v1/images/generations",
    Route.EDIT: "/v1/images/edits",
    Route.INPAINT: "/v1/images/edits",
    Route.UPSCALE: "/v1/images/upscales",
}


@dataclass(frozen=True)
class Ask:
    route: Route
    body: ImagesRequest  # the text fields (EditFields / UpscaleFields for uploads)
    width: int  # of each output image
    height: int
    image: bytes | None = None
    mask: bytes | None = None
    mask_area: float | None = None

    @property
    def strength(self) -> float | None:
        return self.body.strength if isinstance(self.body, EditFields) else None

    def jobs(self, request_id: str, seed: int) -> list[ImageJob]:
        """One job per image: image i uses seed + i, so both arms of a pair get the same seeds."""
        return [
            ImageJob(
                request_id=request_id,
                image_index=i,
                prompt=self.body.prompt,
                seed=seed + i,
                width=self.width,
                height=self.height,
                steps=self.body.steps,
                guidance=self.body.guidance,
                negative_prompt=self.body.negative_prompt,
                image=self.image,
                mask=self.mask,
                strength=self.strength,
                images=self.body.n,
            )
            for i in range(self.body.n)
        ]

    def params(self) -> dict[str, Any]:
        """The parameters both arms of a pair share, as recorded (the seed sits beside them)."""
        params = self.body.generation_params(self.width, self.height)
        if self.image is not None:
            params |= {"image_bytes": len(self.image), "mask": self.mask is not None}
        if self.mask_area is not None:
            params["mask_area"] = round(self.mask_area, 4)
        if self.strength is not None:
            params["strength"] = self.strength
        return params


def generation_ask(body: ImagesRequest, config: Config) -> Ask:
    width, height = body.dimensions(config.server)
    routes = config.route_map
    thumbnail = routes.get(Route.THUMBNAIL)
    if thumbnail is not None and (thumbnail.match or MatchRule()).matches(width, height):
        return Ask(Route.THUMBNAIL, body, width, height)
    return Ask(_served(Route.GENERATE, config), body, width, height)


def edit_ask(upload: Upload, config: Config) -> Ask:
    route = Route.EDIT
    if upload.mask is not None and Route.INPAINT in config.route_map:
        route = Route.INPAINT
    return Ask(
        _served(route, config),
        upload.fields,
        upload.width,
        upload.height,
        upload.image,
        upload.mask,
        upload.mask_area,
    )


def upscale_ask(upload: Upload, config: Config) -> Ask:
    return Ask(
        _served(Route.UPSCALE, config), upload.fields, upload.width, upload.height, upload.image
    )


def _served(route: Route, config: Config) -> Route:
    if route not in config.route_map:
        served = ", ".join(r.value for r in config.route_map)
        raise BadRequest(
            404,
            [
                {
                    "field": "route",
                    "message": f"{ENDPOINT_OF[route]} goes to route {route.value}, which this "
                    f"deployment does not serve (routes: {served})",
                }
            ],
        )
    return route
