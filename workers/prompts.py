"""What a prompt asks to be written: its quoted spans.

One rule for every layer: the typography probes read these spans back, the prompt tags
bucket them by length, and the text-card rehearsal fault draws them. It sits at the
bottom of the package graph so a model server can use it too.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|(?<![A-Za-z0-9])\'([^\']+)\'(?![A-Za-z0-9])')


def requested_text(prompt: str) -> list[str]:
    """The quoted spans a prompt asks to appear in the image."""
    return [next(g for g in match.groups() if g) for match in _QUOTED.finditer(prompt)]
