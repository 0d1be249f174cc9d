"""Prompt features: the tags a request is sliced by, derived from its prompt and parameters.

A candidate can be better on average and still break one kind of prompt: quoted text
longer than a dozen characters, skin under warm light, edits near the mask's edge.
The judge looks for such a slice (`policies/slices.py`); the slices are these tags.

`tags_of` is pure and cheap (a few regular expressions), so the router computes it
for every request and stores the result with it (`requests.tags`), and the lab
computes it for every suite item, adding the item's own tags as `tag:<name>`. A tag is
`key:value`; the keys and their values:

- `text`: the longest quoted span's length in characters, `none`, `1-4`, `5-12` or `13+`
  (the typography probe reads quoted text; long spans are where models fail first);
- `script`: the quoted text's writing system (`latin`, `cyrillic`, `greek`, `cjk`,
  `hangul`, `kana`, `arabic`, `hebrew`, `devanagari`, `thai` or `other`), when it quotes;
- `people`: `yes` when the prompt mentions people, faces or skin;
- `colour`: `named` or `hex` when the prompt names a colour;
- `words`: the prompt's length, `short` (up to 8 words), `medium` (to 25) or `long`;
- `size`, `steps` (`default`, `1-10`, `11-30`, `31+`), `route`;
- `mask`: an edit's mask area, `small` (under 10% of the image), `medium` (to 40%) or
  `large`, from `params["mask_area"]`.

Each model's sampler is part of its settings, not of a request, so it is compared across
models (the bake-off's figures) rather than sliced on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from policies.probes.typography import requested_text

_PEOPLE = re.compile(
    r"\b(people|person|persons|man|men|woman|women|boy|girl|child|children|kid|kids|baby|"
    r"face|faces|portrait|portraits|selfie|skin|skin-tone|family|crowd|bride|groom|couple|"
    r"athlete|doctor|nurse|chef|teacher|worker|student)\b",
    re.IGNORECASE,
)
_COLOURS = (
    "red|orange|yellow|green|blue|purple|violet|pink|brown|black|white|grey|gray|teal|cyan|"
    "magenta|turquoise|beige|gold|golden|silver|maroon|navy|crimson|scarlet|amber|ivory|"
    "lavender|olive|coral|indigo|emerald|burgundy|pastel|sepia|monochrome"
)
_COLOUR = re.compile(rf"\b({_COLOURS})\b", re.IGNORECASE)
_HEX = re.compile(r"(?<![0-9A-Za-z])#(?:[0-9a-fA-F]{6}|[0-9a-fA-F]{3})\b")
# Unicode character-name prefixes, in the order they are tried.
_SCRIPTS = (
    ("LATIN", "latin"),
    ("CYRILLIC", "cyrillic"),
    ("GREEK", "greek"),
    ("CJK", "cjk"),
    ("HANGUL", "hangul"),
    ("HIRAGANA", "kana"),
    ("KATAKANA", "kana"),
    ("ARABIC", "arabic"),
    ("HEBREW", "hebrew"),
    ("DEVANAGARI", "devanagari"),
    ("THAI", "thai"),
)

# How a slice is said in a finding: "candidate worse on <phrase>".
PHRASES = {
    "text:none": "prompts quoting no text",
    "text:1-4": "prompts quoting 1 to 4 characters",
    "text:5-12": "prompts quoting 5 to 12 characters",
    "text:13+": "prompts quoting ≥ 13 characters",
    "people:yes": "prompts mentioning people, faces or skin",
    "colour:named": "prompts naming a colour",
    "colour:hex": "prompts giving a hex colour",
    "words:short": "short prompts (≤ 8 words)",
    "words:medium": "medium prompts (9 to 25 words)",
    "words:long": "long prompts (> 25 words)",
    "mask:small": "edits with a small mask (< 10%)",
    "mask:medium": "edits with a medium mask (10-40%)",
    "mask:large": "edits with a large mask (> 40%)",
}


def tags_of(prompt: str, route: str, params: Mapping[str, Any] | None = None) -> list[str]:
    """The request's tags, sorted: the same prompt and parameters always give the same tags."""
    params = params or {}
    tags = [f"route:{route}", f"words:{_words(prompt)}"]
    quoted = requested_text(prompt)
    longest = max((len(text.strip()) for text in quoted), default=0)
    tags.append(f"text:{_text_bucket(longest)}")
    if quoted:
        tags.append(f"script:{script_of(''.join(quoted))}")
    if _PEOPLE.search(prompt):
        tags.append("people:yes")
    if _HEX.search(prompt):
        tags.append("colour:hex")
    elif _COLOUR.search(prompt):
        tags.append("colour:named")
    if params.get("size"):
        tags.append(f"size:{params['size']}")
    tags.append(f"steps:{_steps(params.get('steps'))}")
    area = params.get("mask_area")
    if area is not None:
        tags.append(f"mask:{'small' if area < 0.1 else 'medium' if area <= 0.4 else 'large'}")
    return sorted(tags)


def stored_or_derived(
    stored: Iterable[str] | None, prompt: str, route: str, params: Mapping[str, Any] | None
) -> list[str]:
    """A request's stored tags, or (recorded before tags were stored, migration 0008) the ones
    its prompt and parameters give: the same pure function either way."""
    return list(stored) if stored is not None else tags_of(prompt, route, params)


def with_hand_tags(tags: Iterable[str], hand: Iterable[str]) -> list[str]:
    """Derived tags plus a suite item's own (`sign` becomes `tag:sign`), sorted."""
    return sorted(set(tags) | {f"tag:{name}" for name in hand})


def script_of(text: str) -> str:
    """The writing system most of the text's letters belong to."""
    tally: dict[str, int] = {}
    for char in text:
        if not char.isalpha():
            continue
        name = unicodedata.name(char, "")
        script = next((s for prefix, s in _SCRIPTS if name.startswith(prefix)), "other")
        tally[script] = tally.get(script, 0) + 1
    return max(sorted(tally), key=lambda s: tally[s]) if tally else "other"


def phrase(slice_name: str) -> str:
    """A slice in words: one tag ("prompts quoting ≥ 13 characters"), or two joined by "and"."""
    return " and ".join(_phrase_one(tag) for tag in slice_name.split(" & "))


def _phrase_one(tag: str) -> str:
    if tag in PHRASES:
        return PHRASES[tag]
    key, _, value = tag.partition(":")
    return {
        "route": f"the {value} route",
        "script": f"prompts quoting {value} script",
        "size": f"{value} images",
        "steps": f"{value} steps",
        "tag": f"items tagged {value}",
    }.get(key, f"prompts tagged {tag}")


def _words(prompt: str) -> str:
    words = len(prompt.split())
    return "short" if words <= 8 else "medium" if words <= 25 else "long"


def _text_bucket(length: int) -> str:
    if length == 0:
        return "none"
    return "1-4" if length <= 4 else "5-12" if length <= 12 else "13+"


def _steps(steps: Any) -> str:
    if steps is None:
        return "default"
    return "1-10" if steps <= 10 else "11-30" if steps <= 30 else "31+"
