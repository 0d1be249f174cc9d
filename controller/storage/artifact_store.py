"""Where images live: the local artifact directory, and optionally an S3-compatible bucket.

`Artifacts.put` writes an image's file (content-addressed, `artifacts.py`) and, with an
object store, uploads it. An upload that fails leaves a marker in `<artifact_dir>/.pending/`
and the file in place: the images wait on local disk, like records in the spill file,
and a thread uploads them once the store answers again (any process on the node does,
after a restart too). So an outage of the store loses nothing and blocks no request.

`ensure_local(path)` is how readers (the scorer, reports, the console) open an image: the
file if this node has it, else fetched from the store of the directory it belongs to.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog

from controller.config import Config, ObjectStoreConfig
from controller.storage.artifacts import artifact_path, store_artifact
from workers.logs import one_line

log = structlog.get_logger("cutover.artifacts")

PENDING = ".pending"


class ObjectStore:
    """One bucket and prefix, through boto3, every call bounded by `timeout`."""

    def __init__(self, settings: ObjectStoreConfig) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.settings = settings
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=BotoConfig(
                connect_timeout=settings.timeout,
                read_timeout=settings.timeout,
                retries={"max_attempts": 1, "mode": "standard"},
            ),
        )

    def key(self, sha256: str) -> str:
        return f"{self.settings.prefix}{sha256[:2]}/{sha256[2:4]}/{sha256}.png"

    def upload(self, sha256: str, path: Path) -> None:
        with open(path, "rb") as data:
            self.client.put_object(
                Bucket=self.settings.bucket,
                Key=self.key(sha256),
                Body=data,
                ContentType="image/png",
            )

    def download(self, sha256: str) -> bytes:
        answer = self.client.get_object(Bucket=self.settings.bucket, Key=self.key(sha256))
        return answer["Body"].read()


class Artifacts:
    """A node's artifact directory, and the object store behind it (if any)."""

    def __init__(self, root: Path, store: ObjectStore | None = None) -> None:
        self.root = Path(root)
        self.store = store
        self.pending_dir = self.root / PENDING
        self._outage = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None:
            self.pending_dir.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(
                target=self._retry_loop, name="cutover-artifact-uploads", daemon=True
            )
            self._thread.start()

    def put(self, data: bytes) -> str:
        """Store an image and send it to the store; its sha256 (`write`, then `send`)."""
        sha256 = self.write(data)
        self.send(sha256)
        return sha256

    def write(self, data: bytes) -> str:
        """The image's local file; its sha256. With a store, the image is marked held until
        `send` uploads it, so a process killed in between leaves it for the next one.
        Raises OSError only if the file cannot be written (the recorder records the output
        without its image, saying why)."""
        sha256 = store_artifact(self.root, data)
        if self.store is not None:
            (self.pending_dir / sha256).touch()
        return sha256

    def send(self, sha256: str) -> None:
        """Upload a written image, or leave it held while the store is known down (the
        uploader thread probes the store and sends held images in order)."""
        if self.store is not None and not self._outage:
            self._upload(sha256)

    def path(self, sha256: str) -> Path:
        return artifact_path(self.root, sha256)

    def local(self, sha256: str) -> Path | None:
        """The image's file on this node, fetched from the store when only it has it."""
        path = self.path(sha256)
        if path.exists():
            return path
        if self.store is None:
            return None
        try:
            data = self.store.download(sha256)
        except Exception as exc:  # not there, or the store is down: the reader says so
            log.warning("artifact_fetch_failed", sha256=sha256, error=one_line(exc))
            return None
        store_artifact(self.root, data)
        return path

    def pending(self) -> list[str]:
        """Images written here and not yet in the store."""
        try:
            return sorted(os.listdir(self.pending_dir))
        except FileNotFoundError:
            return []

    def upload_pending(self) -> int:
        """Upload every held image; how many went (the rest wait for the next try)."""
        sent = 0
        for sha256 in self.pending():
            if not self._upload(sha256):
                break  # still down: try again later, in order
            sent += 1
        return sent

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _upload(self, sha256: str) -> bool:
        assert self.store is not None
        marker = self.pending_dir / sha256
        try:
            self.store.upload(sha256, self.path(sha256))
        except FileNotFoundError:  # the file is gone (the directory was cleaned): nothing to send
            marker.unlink(missing_ok=True)
            return True
        except Exception as exc:  # the store is down or refuses: hold the image here
            marker.touch()
            if not self._outage:
                self._outage = True
                log.error(
                    "object_store_unavailable",
                    bucket=self.store.settings.bucket,
                    error=one_line(exc),
                    note="images are kept in the artifact directory and uploaded once it is back",
                )
            return False
        marker.unlink(missing_ok=True)
        if self._outage:
            self._outage = False
            log.info("object_store_recovered", bucket=self.store.settings.bucket)
        return True

    def _retry_loop(self) -> None:
        assert self.store is not None
        while not self._stop.wait(self.store.settings.retry_interval):
            try:
                self.upload_pending()
            except Exception as exc:  # never let the uploader die
                log.error("artifact_upload_pass_failed", error=one_line(exc))


_registered: dict[str, Artifacts] = {}
_lock = threading.Lock()


def artifacts_for(config: Config) -> Artifacts:
    """This process's `Artifacts` for the config's directory (one per directory, made once)."""
    root = config.artifact_path
    with _lock:
        found = _registered.get(str(root))
        if found is None:
            store = ObjectStore(config.object_store) if config.object_store else None
            found = _registered[str(root)] = Artifacts(root, store)
        return found


def ensure_local(path: str | os.PathLike[str] | None) -> Path | None:
    """An image's file, if this node has it or can fetch it; None otherwise."""
    if path is None:
        return None
    path = Path(path)
    if path.exists():
        return path
    for root, artifacts in list(_registered.items()):
        if str(path).startswith(root + os.sep):
            return artifacts.local(path.stem)
    return None


def forget(root: Any = None) -> None:
    """Drop registered directories (tests that start over in a new directory)."""
    with _lock:
        for key in [k for k in _registered if root is None or k == str(root)]:
            _registered.pop(key).close()
