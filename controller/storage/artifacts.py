"""Content-addressed image files: `ab/cd/<sha256>.png` under the artifact directory.

The same image is stored once however often it is generated, and a record's
sha256 is enough to find its file on any node that mounts the directory.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path


def artifact_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256[2:4] / f"{sha256}.png"


# Directories this process has made: a fan-out directory is made once, not asked for each image.
_made: set[str] = set()
_tmp_names = itertools.count()


def store_artifact(root: Path, data: bytes) -> str:
    """Write `data` once (atomically) and return its sha256.

    Plain os calls on strings, not pathlib: at thousands of images a second the path
    objects alone were a fifth of the artifact writers' time (bench/recorder_throughput.py).
    """
    digest = hashlib.sha256(data).hexdigest()
    directory = os.path.join(root, digest[:2], digest[2:4])
    path = os.path.join(directory, digest + ".png")
    if os.path.exists(path):
        return digest
    if directory not in _made:
        os.makedirs(directory, exist_ok=True)
        _made.add(directory)
    # A name of its own per writer: two threads storing the same image must not share one.
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{next(_tmp_names)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return digest
