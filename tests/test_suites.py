"""Prompt suites: the shipped ones hold what the lab phase needs; a broken one is located."""

from __future__ import annotations

import re

import pytest

from controller.config import Route
from controller.lab.suites import find_suite, load_suite, shipped_suites
from policies.probes.typography import requested_text
from policies.yaml_source import SourceError


def test_every_shipped_suite_loads_with_unique_ids():
    suites = {name: load_suite(path) for name, path in shipped_suites().items()}
    assert {"typography", "people-and-skin", "composition", "colour", "edits", "upscale"} <= set(
        suites
    )
    for name, suite in suites.items():
        assert suite.suite == name  # the file is named after the suite it holds
        assert len({item.id for item in suite.items}) == len(suite.items)


def test_typography_quotes_1_to_40_characters_in_several_scripts_and_cases():
    suite = load_suite(shipped_suites()["typography"])
    lengths = []
    for item in suite.items:
        texts = requested_text(item.prompt)  # what the typography probe asks OCR to find
        assert texts, item.id
        lengths += [len(text) for text in texts]
    assert min(lengths) == 1 and max(lengths) <= 40 and max(lengths) >= 35
    tags = {tag for item in suite.items for tag in item.tags}
    scripts = {"latin", "latin-diacritics", "cyrillic", "greek", "japanese", "chinese"}
    scripts |= {"korean", "arabic", "devanagari"}
    assert len(tags & scripts) >= 8
    assert {"upper", "lower", "mixed"} <= tags
    assert {"sign", "poster", "book-cover"} <= tags


def test_people_cover_the_range_of_skin_tones_and_groups():
    suite = load_suite(shipped_suites()["people-and-skin"])
    tags = {tag for item in suite.items for tag in item.tags}
    tones = {t for t in tags if t.startswith("skin-") and t not in ("skin-mixed", "skin-varied")}
    assert len(tones) >= 7
    assert "group" in tags and len([t for t in tags if t.endswith("light")]) >= 5


def test_brand_colours_are_written_as_hex():
    suite = load_suite(shipped_suites()["colour"])
    hexes = [i for i in suite.items if "hex" in i.tags]
    assert len(hexes) >= 4
    assert all(re.search(r"#[0-9A-F]{6}\b", i.prompt) for i in hexes)


def test_a_suite_is_found_by_name_or_path(tmp_path):
    assert find_suite("colour") == shipped_suites()["colour"]
    own = tmp_path / "mine.yaml"
    own.write_text("suite: mine\nversion: 1\nitems: [{id: a, prompt: 'a fox'}]\n")
    assert find_suite(str(own)) == own
    with pytest.raises(SourceError, match="not a shipped suite .*typography"):
        find_suite("typograhpy")


GOOD_ITEM = "  - {id: a, prompt: 'a fox'}\n"  # line 4 of the file; the item under test is line 5
BAD = {
    "unknown-key": ("  - {id: b, prompt: x, colour: red}", "items.1.colour", "unknown key"),
    "bad-size": ("  - {id: b, prompt: x, size: 500x500}", "items.1.size", "multiples of 8"),
    "duplicate-id": ("  - {id: a, prompt: x}", "items.1.id", "duplicate id 'a'"),
    "edit-without-image": ("  - {id: b, prompt: x, route: edit}", "items.1", "needs an input"),
    "inpaint-without-mask": (
        "  - {id: b, prompt: x, route: inpaint, image: in.png}",
        "items.1",
        "needs a `mask`",
    ),
    "missing-image-file": (
        "  - {id: b, prompt: x, route: upscale, image: gone.png}",
        "items.1.image",
        "'gone.png' is not a file",
    ),
    "unknown-route": ("  - {id: b, prompt: x, route: video}", "items.1.route", "video"),
    "empty-prompt": ("  - {id: b, prompt: ''}", "items.1.prompt", "at least 1 character"),
    "broken-yaml": ("  - {id: b, prompt: [unclosed", None, "invalid YAML"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_malformed_suite_names_file_line_and_key(tmp_path, case):
    item, key, words = BAD[case]
    (tmp_path / "in.png").write_bytes(b"not read here")
    path = tmp_path / "broken.yaml"
    path.write_text("suite: broken\nversion: 1\nitems:\n" + GOOD_ITEM + item + "\n")
    with pytest.raises(SourceError) as caught:
        load_suite(path)
    problems = caught.value.problems
    found = [p for p in problems if words in p.message and (key is None or p.key == key)]
    assert found, [str(p) for p in problems]
    assert found[0].file == str(path)
    assert found[0].line >= 5 if key is None else found[0].line == 5, str(found[0])


def test_routes_with_inputs_are_the_routes_that_carry_an_image(tmp_path):
    (tmp_path / "in.png").write_bytes(b"x")
    (tmp_path / "mask.png").write_bytes(b"x")
    path = tmp_path / "inputs.yaml"
    path.write_text(
        "suite: inputs\nversion: 2\nitems:\n"
        "  - {id: e, route: edit, prompt: 'make it night', image: in.png}\n"
        "  - {id: p, route: inpaint, prompt: 'a hat', image: in.png, mask: mask.png}\n"
        "  - {id: u, route: upscale, prompt: sharp, image: in.png, seed: 3, size: 64x64}\n"
    )
    suite = load_suite(path)
    assert [(i.route, i.image, i.mask) for i in suite.items] == [
        (Route.EDIT, "in.png", None),
        (Route.INPAINT, "in.png", "mask.png"),
        (Route.UPSCALE, "in.png", None),
    ]


def test_the_shipped_inputs_are_what_the_code_draws():
    """Compared by pixels: another PIL may compress the same image to other bytes."""
    import io

    import numpy as np
    from PIL import Image

    from controller.lab.suite_inputs import INPUTS, expected_files

    expected = expected_files()
    assert {p.name for p in INPUTS.glob("*.png")} == set(expected)
    for name, data in expected.items():
        shipped = np.asarray(Image.open(INPUTS / name))
        assert np.array_equal(shipped, np.asarray(Image.open(io.BytesIO(data)))), name


def test_edits_mask_part_of_the_ground_and_upscales_start_small():
    import numpy as np
    from PIL import Image

    edits = load_suite(shipped_suites()["edits"])
    assert {i.route for i in edits.items} == {Route.EDIT, Route.INPAINT}
    folder = shipped_suites()["edits"].parent
    for item in edits.items:
        if item.mask is None:
            continue
        mask = np.asarray(Image.open(folder / item.mask)) > 0
        image = Image.open(folder / item.image)
        assert mask.shape == (image.height, image.width)
        assert 0.03 < mask.mean() < 0.3, (item.id, mask.mean())
        assert not mask[: mask.shape[0] // 2].any(), item.id  # the sky is kept whole
    upscale = load_suite(shipped_suites()["upscale"])
    sides = [Image.open(folder / i.image).width for i in upscale.items]
    assert {i.route for i in upscale.items} == {Route.UPSCALE} and max(sides) <= 128


def test_from_shadow_log_spreads_over_tags_and_time_and_drops_users(tmp_path):
    """300 recorded generations of three kinds (one rare), some repeated; a 20-item suite."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert
    from typer.testing import CliRunner

    from controller.cli import app
    from controller.storage.tables import Request
    from tests.conftest import base_config, prepare_rollout, write_config

    path = write_config(tmp_path, base_config(f"sqlite:///{tmp_path / 'c.db'}"))
    config, store = prepare_rollout(path)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rows = []
    for i in range(300):
        if i % 100 == 7:  # rare: three in all
            prompt = f'a poster that says "RARE {i}"'
        elif i % 2:
            prompt = f"a quiet lake at dawn number {i % 60}"  # repeats after 60
        else:
            prompt = " ".join(["a long and detailed scene with many things"] * 4) + f" {i}"
        rows.append(
            {
                "id": f"req-{i}",
                "route": "generate" if i % 10 else "edit",
                "stage": "shadow",
                "primary_role": "incumbent",
                "sticky_key": f"user-secret-{i}",
                "prompt": prompt,
                "params": {"size": "64x64", "n": 1},
                "seed": 1000 + i,
                "mirrored": False,
                "created_at": start + timedelta(hours=i),
                "judge_progress": 2,
            }
        )
    with store.session() as session:
        session.execute(insert(Request), rows)
    store.close()

    runner = CliRunner()
    target = tmp_path / "suites" / "Representative.yaml"
    args = ["-c", str(path), "suite", "from-shadow-log", "--route", "generate", "--n", "20"]
    result = runner.invoke(app, [*args, "--out", str(target)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert "user-secret" not in text and "req-" not in text
    suite = load_suite(target)
    assert (suite.suite, suite.version, len(suite.items)) == ("representative", 1, 20)
    prompts = [item.prompt for item in suite.items]
    assert len(set(prompts)) == 20 and any("RARE" in p for p in prompts)
    recorded: dict = {}
    for row in rows:  # a repeated prompt is sampled at its first recording
        if row["route"] == "generate":
            recorded.setdefault(row["prompt"], row)
    assert all(p in recorded for p in prompts)  # only the route's own prompts
    hours = sorted((recorded[p]["created_at"] - start).total_seconds() / 3600 for p in prompts)
    assert hours[0] < 75 and hours[-1] > 225  # from the first quarter to the last
    assert all(i.seed == recorded[i.prompt]["seed"] and i.size == "64x64" for i in suite.items)

    again = runner.invoke(app, [*args, "--out", str(target)], catch_exceptions=False)
    assert again.exit_code == 2 and "exists" in again.output
    edits = runner.invoke(
        app,
        [*args[:4], "--route", "edit", "--out", str(tmp_path / "e.yaml")],
        catch_exceptions=False,
    )
    assert edits.exit_code == 2 and "input images the router does not keep" in edits.output


def test_spread_gives_every_group_one_then_shares_by_size():
    from controller.lab.representative import spread

    groups = {("a",): list(range(90)), ("b",): list(range(100, 109)), ("c",): [200]}
    picked = spread(groups, 10)
    assert len(picked) == 10 and 200 in picked
    assert sum(p < 100 for p in picked) == 8  # 90% of the rows, after c and b's one each
    assert spread(groups, 2) == [45, 104]  # two biggest groups, each at its middle
    assert len(spread(groups, 500)) == 100  # never more than there are
