"""Content-addressed image files: `ab/cd/<sha256>.png` under the artifact directory.

The same image is stored once however often it is generated, and a record's
sha256 is enough to find its file on any node that mounts the directory.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def artifact_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256[2:4] / f"{sha256}.png"


# Directories this process has made: a fan-out directory is made once, not asked for each image.
_made: set[Path] = set()


def store_artifact(root: Path, data: bytes) -> str:
    """Write `data` once (atomically) and return its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    path = artifact_path(root, digest)
    if not path.exists():
        if path.parent not in _made:
            path.parent.mkdir(parents=True, exist_ok=True)
            _made.add(path.parent)
        # A name of its own per writer: two threads storing the same image must not share one.
        tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest
