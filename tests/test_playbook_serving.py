"""The playbook over HTTP on a real local Ray: a pool of six tiny models of three kinds, four
routes, two rollouts side by side, a distilled fallback, and malformed uploads."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from controller.config import load_config
from controller.rollout.transitions import create_rollout
from controller.serving import app as serving
from controller.storage.store import Store
from controller.storage.tables import Output, Request
from tests.conftest import router_client, write_config
from tests.test_uploads import IMAGE, MALFORMED, MASK, encoded
from workers.tiny import make_tiny_pipeline

pytestmark = pytest.mark.ray

FALLBACK_AFTER = 1.5
REQUEST_TIMEOUT = 20.0
GEN, EDIT = "gen-next", "edit-v2"


@pytest.fixture(scope="module")
def playbook(tmp_path_factory, ray_serve):
    root = tmp_path_factory.mktemp("playbook")
    models = root / "models"
    built = {
        "sd": make_tiny_pipeline(models / "sd", variant="sd"),
        "sd-next": make_tiny_pipeline(models / "sd-next", variant="sd"),
        "sd-fast": make_tiny_pipeline(models / "sd-fast", variant="fast", distilled=True),
        "edit-v1": make_tiny_pipeline(models / "edit-v1", variant="e1", kind="img2img"),
        "edit-v2": make_tiny_pipeline(models / "edit-v2", variant="e2", kind="img2img"),
        "paint": make_tiny_pipeline(models / "paint", variant="p", kind="inpaint"),
        "up": make_tiny_pipeline(models / "up", variant="u", kind="upscale"),
    }
    common = {"steps": 2, "num_cpus": 0.25, "warmup": [64], "batch_size": 2}
    pool = {name: {"pipeline": str(path), **common} for name, path in built.items()}
    pool["sd-fast"] |= {"sampler": "lcm", "guidance": 1.0}
    pool["edit-v1"]["kind"] = pool["edit-v2"]["kind"] = "img2img"
    pool["paint"]["kind"] = "inpaint"
    pool["up"]["kind"] = "upscale"
    # Served inside the router replica: the upscale route's model, and the edit route's
    # incumbent, whose rollout mirrors to a candidate in its own deployment.
    pool["up"]["in_router"] = pool["edit-v1"]["in_router"] = True
    path = write_config(
        root,
        {
            "name": "editor",
            "database_url": f"sqlite:///{root / 'cutover.db'}",
            "models": pool,
            "routes": {
                "generate": {
                    "model": "sd",
                    "fallback": "sd-fast",
                    "fallback_after": FALLBACK_AFTER,
                },
                "edit": {"model": "edit-v1"},
                "inpaint": {"model": "paint"},
                "upscale": {"model": "up"},
            },
            "rollouts": {
                GEN: {"route": "generate", "candidate": "sd-next", "stages": [30, 100]},
                EDIT: {"route": "edit", "candidate": "edit-v2", "stages": [1, 100]},
            },
            "server": {
                "port": ray_serve,
                "refresh_interval": 0.5,
                "request_timeout": REQUEST_TIMEOUT,
                "mirror_timeout": 20,
                "max_size": 256,
                "max_upload_bytes": 200_000,
            },
        },
    )
    config = load_config(path)
    store = Store(config.resolved_database_url)
    store.upgrade()
    for name in config.plans():
        create_rollout(store, config, "tester", name)
    router = serving.start(config, http_port=ray_serve)
    from ray import serve

    client = router_client(ray_serve)
    yield {
        "config": config,
        "store": store,
        "client": client,
        "router": router,
        "handle": lambda model: serve.get_deployment_handle(model, app_name="editor"),
    }
    client.close()
    serve.delete("editor")
    store.close()


def flush(playbook):
    assert playbook["router"].flush.remote(60).result(timeout_s=90)


def form(*parts):
    """Multipart parts for httpx: text as (None, value), files as (name, bytes)."""
    out = []
    for name, value in parts:
        if isinstance(value, tuple):
            out.append((name, (value[0], value[1], "application/octet-stream")))
        else:
            out.append((name, (None, value.encode())))
    return out


def outputs_of(playbook, request_id):
    with playbook["store"].reader() as session:
        request = session.get(Request, request_id)
        outputs = session.scalars(select(Output).where(Output.request_id == request_id)).all()
        return request, outputs


def test_an_edit_with_a_mask_reaches_the_inpaint_model(playbook):
    client = playbook["client"]
    masked = client.post(
        "/v1/images/edits",
        files=form(
            ("prompt", "paint a door"), ("image", ("i.png", IMAGE)), ("mask", ("m.png", MASK))
        ),
    )
    assert masked.status_code == 200, masked.text
    assert (masked.headers["x-cutover-route"], masked.headers["x-cutover-model"]) == (
        "inpaint",
        "paint",
    )
    plain = client.post(
        "/v1/images/edits",
        files=form(("prompt", "make it blue"), ("image", ("i.png", IMAGE)), ("user", "u-edit")),
    )
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-cutover-route"] == "edit"
    assert plain.headers["x-cutover-model"] in ("edit-v1", "edit-v2")
    assert plain.headers["x-cutover-stage"] == "1"
    flush(playbook)
    request, outputs = outputs_of(playbook, masked.headers["x-cutover-request-id"])
    assert request.route == "inpaint" and request.rollout_id is None and request.params["mask"]
    assert [(o.model, o.status) for o in outputs] == [("paint", "ok")]


def test_two_rollouts_run_side_by_side_each_user_on_one_side_per_route(playbook):
    client = playbook["client"]
    sides: dict[tuple[str, str], set[str]] = {}
    for i in range(12):
        user = f"user-{i}"
        for _ in range(2):
            gen = client.post(
                "/v1/images/generations", json={"prompt": "a fox", "user": user, "steps": 1}
            )
            edit = client.post(
                "/v1/images/edits",
                files=form(
                    ("prompt", "blue"), ("image", ("i.png", IMAGE)), ("user", user), ("steps", "2")
                ),
            )
            assert gen.status_code == edit.status_code == 200, (gen.text, edit.text)
            assert (gen.headers["x-cutover-stage"], edit.headers["x-cutover-stage"]) == ("30", "1")
            sides.setdefault(("generate", user), set()).add(gen.headers["x-cutover-served-by"])
            sides.setdefault(("edit", user), set()).add(edit.headers["x-cutover-served-by"])
    assert all(len(s) == 1 for s in sides.values()), sides
    flush(playbook)
    with playbook["store"].reader() as session:
        routes = dict(
            session.execute(select(Request.route, func.count()).group_by(Request.route)).all()
        )
    assert routes["generate"] >= 24 and routes["edit"] >= 24


def test_a_stalled_model_is_answered_by_the_fallback_inside_the_request_timeout(playbook):
    client, handle = playbook["client"], playbook["handle"]
    for model in ("sd", "sd-next"):
        handle(model).set_faults.remote({"delay": FALLBACK_AFTER + 3}).result(timeout_s=30)
    try:
        answers = []
        for i in range(6):
            started = time.monotonic()
            response = client.post(
                "/v1/images/generations", json={"prompt": "a fox", "user": f"stall-{i}"}
            )
            answers.append((response, time.monotonic() - started))
    finally:
        for model in ("sd", "sd-next"):
            handle(model).set_faults.remote({}).result(timeout_s=30)
    flush(playbook)
    for response, elapsed in answers:
        assert response.status_code == 200, response.text
        assert response.headers["x-cutover-fallback"] == "timeout"
        assert response.headers["x-cutover-model"] == "sd-fast"
        assert FALLBACK_AFTER <= elapsed < REQUEST_TIMEOUT
        request, outputs = outputs_of(playbook, response.headers["x-cutover-request-id"])
        by_role = {o.role: o for o in outputs if o.is_primary}
        failed, answered = by_role[request.primary_role], by_role["fallback"]
        assert (failed.status, failed.timeout_s) == ("timeout", FALLBACK_AFTER)
        assert (answered.status, answered.model, answered.fallback_of) == (
            "ok",
            "sd-fast",
            failed.id,
        )
    # The judge sees the failed attempts, never the fallback's answers in their place.
    from controller.rollout.analysis import load_window
    from controller.rollout.transitions import get_rollout

    with playbook["store"].reader() as session:
        window = load_window(session, get_rollout(session, GEN), {})
    units = {u.request_id: u for u in window.units}
    ids = [r.headers["x-cutover-request-id"] for r, _ in answers]
    judged = [units[i] for i in ids if i in units]
    assert judged  # mirrored requests, both arms recorded
    for unit in judged:
        assert set(unit.arms) == {"incumbent", "candidate"}
        assert all(arm.statuses == ["timeout"] for arm in unit.arms.values())


def test_an_upscale_comes_back_four_times_larger(playbook):
    import base64
    import io

    from PIL import Image

    response = playbook["client"].post(
        "/v1/images/upscales",
        files=form(("image", ("s.png", encoded((16, 16)))), ("prompt", "sharp"), ("seed", "3")),
    )
    assert response.status_code == 200, response.text
    assert (response.headers["x-cutover-route"], response.headers["x-cutover-model"]) == (
        "upscale",
        "up",
    )
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.size == (64, 64)


def test_models_in_the_router_have_no_deployment_and_fail_like_any_model(playbook):
    from ray import serve

    client, router = playbook["client"], playbook["router"]
    deployments = set(serve.status().applications["editor"].deployments)
    assert {"up", "edit-v1"}.isdisjoint(deployments)
    assert {"router", "sd", "sd-fast", "sd-next", "edit-v2", "paint"} <= deployments
    assert client.get("/v1/stats").json()["in_router"] == ["edit-v1", "up"]

    body = form(("image", ("s.png", encoded((16, 16)))), ("prompt", "sharp"), ("seed", "4"))
    router.set_faults.remote("up", {"error_percent": 100}).result(timeout_s=30)
    try:
        failed = client.post("/v1/images/upscales", files=body)
    finally:
        router.set_faults.remote("up", {}).result(timeout_s=30)
    assert failed.status_code == 502, failed.text
    assert failed.json()["error"]["type"] == "model_error"
    assert "injected fault" in failed.json()["error"]["message"]
    assert client.post("/v1/images/upscales", files=body).status_code == 200
    with pytest.raises(KeyError, match="not served in the router"):
        router.set_faults.remote("sd", {}).result(timeout_s=30)

    flush(playbook)
    request, outputs = outputs_of(playbook, failed.headers["x-cutover-request-id"])
    assert request.route == "upscale"
    assert [(o.model, o.status, o.is_primary) for o in outputs] == [("up", "error", True)]


def test_a_route_no_config_serves_is_a_404(tmp_path):
    from controller.config import load_config as load
    from controller.serving.api import BadRequest
    from controller.serving.asks import upscale_ask
    from controller.serving.uploads import parse_upscale

    config = load(
        write_config(
            tmp_path,
            {"name": "x", "models": {"incumbent": {"pipeline": "org/a"}}},
        )
    )
    upload = parse_upscale([("image", ("s.png", encoded((16, 16))))], config.server)
    with pytest.raises(BadRequest) as caught:
        upscale_ask(upload, config)
    assert caught.value.status == 404 and "route upscale" in str(caught.value)


def test_no_malformed_upload_gets_a_5xx_or_reaches_a_model(playbook):
    client = playbook["client"]
    with playbook["store"].reader() as session:
        before = session.scalar(select(func.count()).select_from(Request))
    statuses = {}
    for case_id, parse, parts, status, field, _ in MALFORMED:
        path = "/v1/images/edits" if parse.__name__ == "parse_edit" else "/v1/images/upscales"
        if path.endswith("upscales"):
            continue  # below
        response = client.post(path, files=form(*parts))
        statuses[case_id] = response.status_code
        assert response.status_code == status, (case_id, response.text)
        assert response.json()["error"]["param"] == field
    broken = [
        (
            "not-multipart",
            {"content": b'{"prompt": "x"}', "headers": {"content-type": "application/json"}},
            415,
        ),
        (
            "broken-multipart",
            {
                "content": b"--x\r\nnonsense",
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
            400,
        ),
    ]
    for case_id, kwargs, status in broken:
        response = client.post("/v1/images/edits", **kwargs)
        assert response.status_code == status, (case_id, response.text)
    for case_id, parse, parts, status, field, _ in MALFORMED:
        if parse.__name__ == "parse_upscale":
            response = client.post("/v1/images/upscales", files=form(*parts))
            assert response.status_code == status, (case_id, response.text)
            assert response.json()["error"]["param"] == field
    flush(playbook)
    with playbook["store"].reader() as session:
        assert session.scalar(select(func.count()).select_from(Request)) == before
    assert all(400 <= s < 500 for s in statuses.values())


# -- fuzzing every endpoint (hypothesis, over HTTP to the real router) ---------------------

FIELDS = [
    "prompt", "n", "size", "response_format", "user", "seed", "steps", "guidance",
    "negative_prompt", "model", "quality", "style", "strength", "image", "mask",
]  # fmt: skip
FUZZ_COUNTS = {"cases": 0, "5xx": 0, "refused": 0}


def _values():
    from hypothesis import strategies as st

    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )


def _generation_bodies():
    from hypothesis import strategies as st

    plausible = st.fixed_dictionaries(
        {"prompt": st.text(max_size=30)},
        optional={
            "n": st.integers(-1, 2),
            "size": st.sampled_from(["64x64", "48x48", "64x72", "256x64", "x", "1e3x64", "0x0"]),
            "steps": st.integers(-1, 2),
            "seed": st.integers(-5, 2**64),
            "user": st.text(max_size=10),
            "guidance": st.floats(allow_nan=True, allow_infinity=True),
        },
    )
    anything = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), _values(), max_size=8)
    return st.one_of(
        plausible.map(lambda d: ("json", d)),
        anything.map(lambda d: ("json", d)),
        st.binary(max_size=200).map(lambda b: ("raw", b)),
        st.sampled_from(
            [b"[]", b"null", b'"x"', b'{"prompt": NaN}', b'{"prompt":"a","prompt":"b"}']
        ).map(lambda b: ("raw", b)),
    )


def _uploads():
    from hypothesis import strategies as st

    from tests.test_uploads import bomb, gif_animation

    files = st.sampled_from(
        [IMAGE, MASK, encoded((64, 64), mode="RGBA"), encoded((72, 40)), b"", b"\x89PNG\r\n\x1a\n",
         IMAGE[: len(IMAGE) // 2], gif_animation(), bomb(), encoded(fmt="JPEG")]
    ) | st.binary(max_size=64)  # fmt: skip
    part = st.tuples(
        st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8),
        st.one_of(
            st.tuples(st.text(max_size=8), files),
            st.text(max_size=30),
        ),
    )
    return st.lists(part, max_size=6)


def _rejected_before_a_model(response) -> str | None:
    """The request id of a refusal made before any model saw the request."""
    if response.status_code < 400:
        return None
    error = response.json().get("error", {})
    if error.get("type") != "invalid_request_error":
        return None
    return response.headers["x-cutover-request-id"]


def test_fuzzed_requests_to_every_endpoint_are_never_5xx_and_refusals_write_nothing(playbook):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = playbook["client"]
    refused: list[str] = []

    def check(response) -> None:
        FUZZ_COUNTS["cases"] += 1
        if response.status_code >= 500:
            FUZZ_COUNTS["5xx"] += 1
        assert response.status_code < 500, (response.status_code, response.text[:500])
        request_id = _rejected_before_a_model(response)
        if request_id is not None:
            refused.append(request_id)

    fuzz = settings(
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @settings(fuzz, max_examples=500)
    @given(body=_generation_bodies())
    def generations(body):
        kind, value = body
        if kind == "json":  # NaN and Infinity too, as clients send them
            value = json.dumps(value, allow_nan=True).encode()
        check(
            client.post(
                "/v1/images/generations",
                content=value,
                headers={"content-type": "application/json"},
            )
        )

    @settings(fuzz, max_examples=300)
    @given(parts=_uploads(), endpoint=st.sampled_from(["edits", "upscales"]))
    def uploads(parts, endpoint):
        check(client.post(f"/v1/images/{endpoint}", files=form(*parts) or None, data=None))

    @settings(fuzz, max_examples=200)
    @given(
        endpoint=st.sampled_from(["generations", "edits", "upscales"]),
        content_type=st.sampled_from(
            ["", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x",
             "application/x-www-form-urlencoded", "application/json; charset=latin-1"]
        ),
        raw=st.binary(max_size=300),
    )  # fmt: skip
    def raw(endpoint, content_type, raw):
        headers = {"content-type": content_type} if content_type else {}
        check(client.post(f"/v1/images/{endpoint}", content=raw, headers=headers))

    generations()
    uploads()
    raw()
    flush(playbook)
    FUZZ_COUNTS["refused"] = len(refused)
    print(f"fuzz: {FUZZ_COUNTS}")
    assert FUZZ_COUNTS["cases"] >= 1000 and FUZZ_COUNTS["5xx"] == 0
    assert len(refused) > 500, "most generated cases are refusals"
    with playbook["store"].reader() as session:
        written = session.scalar(
            select(func.count()).select_from(Request).where(Request.id.in_(refused))
        )
    assert written == 0, "a refused request was recorded"
