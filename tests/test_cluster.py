"""A real two-node Ray cluster on this machine: `ray start --head` and a second
`ray start --address`, each with its own resources and temp dir. `cutover serve --address`
puts the router and the incumbent on the head, the candidate on the worker node, on
PostgreSQL and an S3-compatible store (moto's server). Traffic flows, the rollout advances
and rolls back, and killing the worker node (kill -9 of every process of it) mid-traffic
fails no request: users the candidate served get the incumbent's answer, and every
request and output is recorded.

Marked `cluster`: `make test` runs it after the main suite, in its own pytest process, so
two Ray clusters never share the 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from controller.serving.app import free_port
from controller.storage.store import Store
from controller.storage.tables import Output, Request
from tests.conftest import wait_until, write_config

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).parent / "ray")
# Every process of the cluster (nodes, `cutover serve`, `ray list`) uses the token Ray 2.60
# writes under ~/.ray; nodes on one machine talk over 127.0.0.1.
ENV = os.environ | {"RAY_AUTH_MODE": "token"}


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Node:
    """One `ray start --block` and everything it starts, killable as one."""

    def __init__(self, args: list[str], temp_dir: str) -> None:
        self.temp_dir = temp_dir
        self.proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir}",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=ENV,
        )

    def kill(self) -> None:
        """kill -9 of the node: its process group, and any process of it that left the group
        (found by its temp dir on the command line)."""
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def _pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline or _group(int(entry.name)) == self.proc.pid:
                pids.append(int(entry.name))
        return pids


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture(scope="module")
def cluster():
    gcs, dashboard = free_port(), free_port()
    head_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    head = Node(
        [
            "--head",
            f"--port={gcs}",
            "--num-cpus=2",
            '--resources={"head": 4}',
            "--include-dashboard=true",  # the state API (`ray list`) is served by it
            f"--dashboard-port={dashboard}",
        ],
        head_dir,
    )
    worker = None
    try:
        assert wait_until(lambda: _listening(gcs), 60), "the head did not start"
        worker = Node(
            [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"models": 4}'],
            worker_dir,
        )
        address, state = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        assert wait_until(lambda: len(_nodes(state)) == 2, 120), "the worker did not join"
        yield {"address": address, "state": state, "head": head, "worker": worker}
    finally:
        for node in (worker, head):
            if node is not None:
                node.kill()
        for directory in (head_dir, worker_dir):
            shutil.rmtree(directory, ignore_errors=True)


def _nodes(state: str) -> list[dict]:
    listed = subprocess.run(
        [RAY, "list", "nodes", "--address", state, "--format", "json", "--filter", "state=ALIVE"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    try:
        return json.loads(listed.stdout)
    except ValueError:
        return []


def _actors(state: str) -> list[dict]:
    listed = subprocess.run(
        [RAY, "list", "actors", "--address", state, "--format", "json", "--detail",
         "--filter", "state=ALIVE", "--limit", "500"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )  # fmt: skip
    return json.loads(listed.stdout)


def cutover(path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", "-c", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_two_nodes_serve_advance_roll_back_and_lose_the_worker_without_a_5xx(
    cluster, tiny_models, postgres_url, s3, tmp_path
):
    settings, _ = s3
    port, console = free_port(), free_port()
    model = {"steps": 2, "num_cpus": 0.5, "batch_size": 2, "warmup": [64]}
    path = write_config(
        tmp_path,
        {
            "name": "two-nodes",
            "database_url": postgres_url,
            "object_store": settings,
            "models": {
                "incumbent": {
                    "pipeline": str(tiny_models["incumbent"]),
                    **model,
                    "resources": {"head": 1},
                },
                "candidate": {
                    "pipeline": str(tiny_models["candidate"]),
                    **model,
                    "resources": {"models": 1},
                },
            },  # fmt: skip
            "rollout": {"stages": ["shadow", 50, 100], "min_samples": 0},
            "server": {
                "port": port,
                "num_cpus": 0.25,
                "resources": {"head": 1},
                "proxy_location": "HeadOnly",
                "request_timeout": 20,  # a call to the dead node hangs: 10 s, then the incumbent
                "mirror_timeout": 10,
            },
            "scorer": {"actors": 0},
            "console": {"port": console},
        },
    )
    env = ENV | {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    assert (
        cutover(path, "init", "--skip-validation", "--reason", "two nodes", env=env).returncode == 0
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "controller", "-c", str(path), "serve", "--address",
         cluster["address"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=90)
    sent: list[httpx.Response] = []

    def traffic(prefix: str, count: int) -> list[httpx.Response]:
        def one(i: int) -> httpx.Response:
            return client.post(
                "/v1/images/generations", json={"prompt": "a fox", "user": f"{prefix}-{i}"}
            )

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(one, range(count)))
        sent.extend(responses)
        return responses

    def up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, 240), serve.stderr.read() if serve.poll() is not None else "slow"
        # Placement: router and incumbent on the head, the candidate on the worker node.
        nodes = {n["node_id"]: n for n in _nodes(cluster["state"])}
        head_id = next(i for i, n in nodes.items() if n["is_head_node"])
        placed = {
            a["class_name"].split(":")[-1]: a["node_id"]
            for a in _actors(cluster["state"])
            if a["class_name"].startswith("ServeReplica:two-nodes")
        }
        assert placed["router"] == placed["incumbent"] == head_id, placed
        assert placed["candidate"] != head_id, placed

        assert all(r.status_code == 200 for r in traffic("shadow", 12))
        moved = cutover(path, "advance", "--force", "--reason", "to 50%", env=env)
        assert moved.returncode == 0, moved.stderr
        assert wait_until(
            lambda: client.get("/v1/rollouts").json()["rollouts"]["two-nodes"]["stage"] == "50",
            30,
        )
        canary = traffic("canary", 16)
        assert all(r.status_code == 200 for r in canary)
        assert {r.headers["x-cutover-served-by"] for r in canary} == {"incumbent", "candidate"}

        # The worker node dies mid-traffic.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            during = pool.submit(traffic, "lost", 24)
            time.sleep(0.5)  # let the first requests start: the node dies under load
            cluster["worker"].kill()
            lost = during.result()
        after = traffic("after", 12)
        for response in lost + after:
            assert response.status_code == 200, response.text
        # Once the node is gone, the candidate's users are answered by the incumbent.
        retried = [r for r in after if r.headers["x-cutover-served-by"] == "candidate"]
        assert retried and all(r.headers["x-cutover-model"] == "incumbent" for r in retried)

        # The loop may have rolled back already: the candidate's errors fail `error_rate`.
        rolled = cutover(path, "rollback", "--reason", "lost the GPU node", env=env)
        assert rolled.returncode == 0 or "already rolled back" in rolled.stderr, rolled.stderr
        history = cutover(path, "history", "--json", env=env).stdout.strip().splitlines()
        last = json.loads(history[-1])
        assert last["verb"] == "rollback", last
        print(f"rolled back by {last['actor']}: {last['reason']}")
        assert wait_until(
            lambda: (
                client.get("/v1/rollouts").json()["rollouts"]["two-nodes"]["state"] == "rolled_back"
            ),
            30,
        )
        final = traffic("rolled", 8)
        assert all(
            r.status_code == 200 and r.headers["x-cutover-served-by"] == "incumbent" for r in final
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
        client.close()
    # Nothing lost: every request sent is a row, with its primary outputs.
    store = Store(postgres_url)
    ids = [r.headers["x-cutover-request-id"] for r in sent]
    with store.reader() as session:
        recorded = session.scalar(
            select(func.count()).select_from(Request).where(Request.id.in_(ids))
        )
        answered = session.scalar(
            select(func.count(func.distinct(Output.request_id))).where(
                Output.request_id.in_(ids), Output.status == "ok", Output.is_primary.is_(True)
            )
        )
        failed_on_worker = session.scalar(
            select(func.count()).where(
                Output.request_id.in_(ids), Output.role == "candidate", Output.status == "error"
            )
        )
    store.close()
    assert recorded == len(sent) == answered
    assert failed_on_worker > 0, "the node's death is recorded as the candidate's errors"
