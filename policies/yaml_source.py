"""Read YAML while remembering the line of every key.

Config errors must say *where* the mistake is. PyYAML's plain loader forgets
line numbers, so we compose the node tree once, index every key path to its
line, and build the plain Python data from the same tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Path_ = tuple[str, ...]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_KEY_AT_LINE = re.compile(r"^\s*-?\s*([A-Za-z0-9_.+\-]+)\s*:")


@dataclass(frozen=True)
class Problem:
    """One mistake in a YAML file, located well enough to fix without searching."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class SourceError(Exception):
    """Raised with every problem found, so the user fixes them in one pass."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class YamlSource:
    """Parsed YAML data plus the line of each key path (keys as strings)."""

    file: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: tuple[Any, ...]) -> int:
        """Line of the longest prefix of `path` that exists in the file."""
        parts = tuple(str(p) for p in path)
        for end in range(len(parts), -1, -1):
            if parts[:end] in self.lines:
                return self.lines[parts[:end]]
        return 1

    def known_prefix(self, path: tuple[Any, ...]) -> Path_:
        parts = tuple(str(p) for p in path)
        for end in range(len(parts), -1, -1):
            if parts[:end] in self.lines:
                return parts[:end]
        return ()

    def problem(self, path: tuple[Any, ...], message: str) -> Problem:
        key = ".".join(str(p) for p in path) or "(top level)"
        return Problem(self.file, self.line_of(path), key, message)


def load_yaml(path: Path, *, expand_env: bool = True) -> YamlSource:
    """Load `path`; raise SourceError naming file and line on any syntax problem."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError([Problem(name, 0, "(file)", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError([Problem(name, 0, "(file)", f"cannot read file: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(exc, "problem", None) or str(exc)
        key = _nearest_key(text, line)
        raise SourceError([Problem(name, line, key, f"invalid YAML: {reason}")]) from None
    source = YamlSource(name, data)
    problems: list[Problem] = []
    if node is not None:
        source.lines[()] = node.start_mark.line + 1
        _index(node, (), source, problems)
    if expand_env and not problems:
        source.data = _expand(source.data, (), source, problems)
    if problems:
        raise SourceError(problems)
    return source


def _nearest_key(text: str, line: int) -> str:
    """The key written at or above `line`, to anchor a syntax error for the reader."""
    rows = text.splitlines()
    for row in reversed(rows[: max(line, 1)]):
        match = _KEY_AT_LINE.match(row)
        if match:
            return match.group(1)
    return "(top level)"


def _index(node: yaml.Node, path: Path_, source: YamlSource, problems: list[Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key_path in source.lines:
                first = source.lines[key_path]
                problems.append(
                    Problem(
                        source.file,
                        line,
                        ".".join(key_path),
                        f"duplicate key (first set on line {first})",
                    )
                )
            source.lines[key_path] = line
            _index(value_node, key_path, source, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            item_path = (*path, str(index))
            source.lines[item_path] = item.start_mark.line + 1
            _index(item, item_path, source, problems)


def _expand(value: Any, path: Path_, source: YamlSource, problems: list[Problem]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in string values, so secrets stay out of files."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), source, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, str(i)), source, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(
            source.problem(
                path,
                f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)",
            )
        )
        return match.group(0)

    return _ENV_REF.sub(substitute, value)


M = TypeVar("M", bound=BaseModel)


def validate_source(source: YamlSource, model: type[M], empty_hint: str = "") -> M:
    """Validate YAML data against a pydantic model; every error names file, line and key."""
    if source.data is None:
        raise SourceError([source.problem((), f"file is empty: {empty_hint}".rstrip(": "))])
    if not isinstance(source.data, dict):
        kind = type(source.data).__name__
        raise SourceError(
            [source.problem((), f"the top level must be a mapping of keys, not {kind}")]
        )
    try:
        return model.model_validate(source.data)
    except ValidationError as exc:
        raise SourceError([_explain(source, model, err) for err in exc.errors()]) from None


def _explain(source: YamlSource, root: type[BaseModel], err: Any) -> Problem:
    """Turn one pydantic error into a Problem a release engineer can act on."""
    loc: tuple[Any, ...] = tuple(err["loc"])
    kind = err["type"]
    # Pydantic adds the per-stage wildcard and union tags to loc; drop what the file lacks.
    shown = loc if kind in ("missing", "extra_forbidden") else source.known_prefix(loc)
    shown = tuple(str(p) for p in shown if p != "*")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        message = f"unknown key {str(loc[-1])!r}; allowed here: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
        if "input" in err and kind != "value_error" and not isinstance(err["input"], dict | list):
            message = f"{message} (got {err['input']!r})"
    problem = source.problem(shown, message)
    return Problem(problem.file, source.line_of(loc), problem.key, message)


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        inner = [
            a
            for a in getattr(annotation, "__args__", ())
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif inner:
            model = inner[0]
        else:
            break
    return sorted(model.model_fields)
