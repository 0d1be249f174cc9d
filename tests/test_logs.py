"""Events of every process reach one file and `cutover serve`'s stderr; the level is honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from tests.conftest import base_config, write_config
from workers.logs import follow

WRITER = """
import sys
from pathlib import Path
import structlog
from workers.logs import configure_logging, log_to_file
configure_logging(level="info")
log_to_file(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    structlog.get_logger("t").warning("records_spilled", rows=i, role="candidate")
"""


def test_events_of_other_processes_are_followed_onto_stderr(tmp_path):
    path = tmp_path / "logs" / "events.jsonl"
    seen: list[str] = []
    stop = threading.Event()
    follower = threading.Thread(
        target=follow,
        args=(path, stop, seen.append),
        kwargs={"skip_pid": os.getpid(), "interval": 0.02},
    )
    follower.start()
    try:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(path), "50"],
                env=os.environ | {"PYTHONPATH": os.getcwd()},
            )
            for _ in range(3)
        ]
        assert all(w.wait(60) == 0 for w in writers)
        own = json.dumps({"event": "mine", "pid": os.getpid()})
        with path.open("a") as handle:
            handle.write(own + "\n")
    finally:
        stop.set()
        follower.join(10)
    events = [json.loads(line) for line in seen]
    assert len(events) == 150  # whole lines from three writers, nothing of our own
    assert {e["pid"] for e in events} == {w.pid for w in writers}
    assert all(e["event"] == "records_spilled" and e["role"] == "candidate" for e in events)
    assert all("host" in e and "timestamp" in e for e in events)
    assert sorted(e["rows"] for e in events if e["pid"] == writers[0].pid) == list(range(50))


def run_init(path, *flags, env_level=None):
    env = {k: v for k, v in os.environ.items() if k != "CUTOVER_LOG_LEVEL"}
    if env_level:
        env["CUTOVER_LOG_LEVEL"] = env_level
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            *flags,
            "-c",
            str(path),
            "init",
            "--skip-validation",
            "--reason",
            "test",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cutover_log_level_from_the_environment_and_the_flag_over_it(tmp_path):
    for name, flags, env_level, shown in [
        ("default", (), None, False),  # the CLI's default is warning
        ("env", (), "info", True),  # CUTOVER_LOG_LEVEL is honoured (the flag's default hid it)
        ("flag", ("--log-level", "warning"), "info", False),  # an explicit flag wins
    ]:
        directory = tmp_path / name
        directory.mkdir()
        path = write_config(directory, base_config(f"sqlite:///{directory / 'c.db'}"))
        result = run_init(path, *flags, env_level=env_level)
        assert result.returncode == 0, result.stderr
        assert ("rollout_created" in result.stderr) is shown, (name, result.stderr)
