"""Prompt suites: the versioned sets of prompts a bake-off or a validation renders.

A suite is a YAML file (`suite`, `version`, `items`); cutover ships some under
`controller/lab/suites/`, and a team writes its own beside its config. Each item is
one request as the router would see it: a route, a prompt, tags for slicing results,
and optionally a size, a seed, and an input image and mask (paths relative to the
suite file). The version is part of what a validation records, so a changed suite
asks for a new validation rather than silently passing on an old one.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from controller.config import Route
from policies.yaml_source import Problem, SourceError, load_yaml, validate_source
from workers.config import Strict

SHIPPED = Path(__file__).parent / "suites"
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NAME = r"^[a-z0-9][a-z0-9-]*$"
# Routes whose requests carry an input image, and the one that also needs a mask.
NEEDS_IMAGE = {Route.EDIT, Route.INPAINT, Route.UPSCALE}


class SuiteItem(Strict):
    """One request of a suite."""

    id: str = Field(pattern=_NAME, max_length=64)
    route: Route = Route.GENERATE
    prompt: str = Field(min_length=1, max_length=2000)
    tags: list[str] = []
    size: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**31)
    image: str | None = None
    mask: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = _SIZE.match(value)
        if not match or any(int(side) % 8 or int(side) == 0 for side in match.groups()):
            raise ValueError(f"size {value!r} is not WIDTHxHEIGHT in multiples of 8, e.g. 512x512")
        return value

    @model_validator(mode="after")
    def _inputs_fit_the_route(self) -> SuiteItem:
        if self.route in NEEDS_IMAGE and self.image is None:
            raise ValueError(f"a {self.route.value} item needs an input `image`")
        if self.route not in NEEDS_IMAGE and self.image is not None:
            raise ValueError(f"a {self.route.value} item takes no input image; use route edit")
        if self.route == Route.INPAINT and self.mask is None:
            raise ValueError("an inpaint item needs a `mask`")
        if self.mask is not None and self.route != Route.INPAINT:
            raise ValueError("only an inpaint item takes a `mask`")
        return self


class Suite(Strict):
    """A named, versioned list of items; ids are unique within it."""

    suite: str = Field(pattern=_NAME, max_length=64)
    version: int = Field(ge=1)
    description: str = ""
    items: list[SuiteItem] = Field(min_length=1)


def load_suite(path: Path) -> Suite:
    """Read and check a suite file; every problem names the file, line and key."""
    source = load_yaml(path, expand_env=False)
    suite = validate_source(source, Suite, "a suite needs `suite`, `version` and `items`")
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for index, item in enumerate(suite.items):
        if item.id in first:
            problems.append(
                source.problem(
                    ("items", index, "id"),
                    f"duplicate id {item.id!r} (first used by item {first[item.id]})",
                )
            )
        first.setdefault(item.id, index)
        for key in ("image", "mask"):
            name = getattr(item, key)
            if name is not None and not (path.parent / name).is_file():
                problems.append(
                    source.problem(
                        ("items", index, key), f"{name!r} is not a file next to the suite"
                    )
                )
    if problems:
        raise SourceError(problems)
    return suite


def shipped_suites() -> dict[str, Path]:
    """The suites that come with cutover, by name."""
    return {path.stem: path for path in sorted(SHIPPED.glob("*.yaml"))}


def find_suite(name_or_path: str) -> Path:
    """A shipped suite by name, or a suite file by path."""
    shipped = shipped_suites()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise SourceError(
        [
            Problem(
                name_or_path,
                0,
                "(suite)",
                f"no such suite file, and not a shipped suite ({', '.join(shipped)})",
            )
        ]
    )
