"""Malformed config and policy files, generated: no traceback, and always a line number.

Hypothesis mutates valid files line by line (deletions, duplicates, indentation, values
replaced by YAML's sharp edges, truncation, garbage lines). Loading each either works or
raises the one error type the CLI turns into a message (exit 2), every problem of which
names the file and a line inside it.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.config import ConfigError, load_config
from policies.policy import DEFAULT_POLICY, load_policy

ROOT = Path(__file__).parents[1]
PLAYBOOK = """name: playbook
models:
  sd:      {pipeline: ./models/sd}
  sd-next: {pipeline: ./models/sd-next}
  sd-fast: {pipeline: ./models/sd-fast, sampler: lcm, steps: 2, guidance: 1}
  edit-v1: {pipeline: ./models/edit-v1, kind: img2img}
  edit-v2: {pipeline: ./models/edit-v2, kind: img2img}
routes:
  generate:  {model: sd, fallback: sd-fast, fallback_after: 5s}
  thumbnail: {model: sd-fast, match: {max_side: 256}}
  edit:      {model: edit-v1}
rollouts:
  sd-next:
    route: generate
    candidate: sd-next
    min_samples: {shadow: 50, "10": 20}
    approval: {"60": {url: "http://cab.example/approve", timeout: 30m}}
  edit-v2: {route: edit, candidate: edit-v2, stages: [1, 10, 100]}
notifications:
  receivers:
    - {name: ops, url: "http://hooks.example/x", min_severity: warning, format: slack}
console: {port: 8081}
server: {port: 8000, metrics: true}
"""
SHARP_VALUES = [
    "",
    "null",
    "~",
    "[",
    "]",
    "{",
    "}",
    "{a: }",
    "- x",
    "x: y: z",
    "&anchor",
    "*alias",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    "1e999",
    "-1",
    "0",
    "1000000000000000000000000",
    "0x1F",
    "yes",
    "'unterminated",
    '"unterminated',
    "2h30",
    "-5s",
    "http//nope",
    "\t",
    "é∂漢",
    "[1, [2, [3]]]",
    "{route: nowhere}",
    "%",
    "@",
    "`",
    "|",
    ">",
]


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(
            st.sampled_from(
                ["delete", "duplicate", "indent", "dedent", "value", "garbage", "swap", "cut"]
            )
        )
        line = lines[i]
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, line)
        elif op == "indent":
            lines[i] = "  " + line
        elif op == "dedent":
            lines[i] = line[2:] if line.startswith("  ") else line.lstrip()
        elif op == "value":
            head = line.split(":", 1)[0] if ":" in line else line
            lines[i] = f"{head}: {draw(st.sampled_from(SHARP_VALUES))}"
        elif op == "garbage":
            lines.insert(i, draw(st.sampled_from(SHARP_VALUES) | st.text(max_size=12)))
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = line[: draw(st.integers(0, len(line)))]
    return "\n".join(lines) + "\n"


def assert_located(exc: ConfigError, path: Path, text: str) -> None:
    assert exc.problems, "an error with no problem in it"
    last = len(text.splitlines()) + 1
    for problem in exc.problems:
        assert problem.file == str(path), problem
        assert 1 <= problem.line <= last, problem
        assert f"{path}:{problem.line}: " in str(exc)


FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_mutated_config_files_load_or_name_a_line(tmp_path_factory, data):
    source = data.draw(st.sampled_from(["example", "playbook"]))
    text = (ROOT / "examples" / "cutover.yaml").read_text() if source == "example" else PLAYBOOK
    text = data.draw(mutated(text))
    path = tmp_path_factory.mktemp("fuzz") / "cutover.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert_located(exc, path, text)


@FUZZ
@given(data=st.data())
def test_mutated_policy_files_load_or_name_a_line(tmp_path_factory, data):
    text = data.draw(mutated(DEFAULT_POLICY.read_text()))
    path = tmp_path_factory.mktemp("fuzz") / "policy.yaml"
    path.write_text(text)
    try:
        load_policy(path)
    except ConfigError as exc:
        assert_located(exc, path, text)


def test_the_unmutated_files_load(tmp_path):
    path = tmp_path / "cutover.yaml"
    path.write_text(PLAYBOOK)
    assert sorted(load_config(path).plans()) == ["edit-v2", "sd-next"]
    load_config(ROOT / "examples" / "cutover.yaml")
    load_policy(DEFAULT_POLICY)
