"""Notification delivery latency through the outbox, against a webhook POSTed inline.

    python -m bench.notification_latency [--events 400] [--rate 20] [--database-url URL]

Events are emitted at `--rate` per second over 4 rollouts, each in its own transaction
as a transition writes it, while the dispatcher runs as `cutover serve` runs it (its own
thread, default `poll_interval` 0.5 s, and 0.1 s for comparison). A local receiver notes
each event's arrival; latency is arrival minus the commit of the event's transaction.
Beside it, what a user would run instead: the webhook POSTed inline by the code that
made the transition (no outbox: nothing survives a receiver that is down).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import structlog

from controller.operations.settings import NotificationsConfig
from controller.storage.store import Store


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(
    store: Store,
    settings: NotificationsConfig,
    arrivals: dict[str, float],
    events: int,
    rate: float,
    label: str,
) -> list[float]:
    from controller.operations.dispatcher import Dispatcher
    from controller.operations.outbox import Event, emit

    committed: dict[str, float] = {}
    stop = threading.Event()
    dispatcher = Dispatcher(store, settings)
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        start = time.perf_counter()
        for i in range(events):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            key = f"{label}:{i}"
            with store.session() as session:
                emit(session, settings, Event(key, "transition", "info", key, rollout=f"r{i % 4}"))
            committed[key] = time.perf_counter()
        deadline = time.monotonic() + 60
        while (
            sum(k.startswith(label + ":") for k in arrivals) < events
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        dispatcher.close()
    return [(arrivals[key] - committed[key]) * 1000 for key in committed if key in arrivals]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    from tests.receiver import Receiver

    receiver = Receiver()
    arrivals: dict[str, float] = {}

    def note(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        arrivals.setdefault(body.get("key", ""), time.perf_counter())
        return 200, {}

    receiver.answer = note
    url = args.database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'notify.db'}"
    store = Store(url)
    store.upgrade()
    rows = {}
    try:
        for poll in (0.5, 0.1):
            settings = NotificationsConfig.model_validate(
                {"receivers": [{"name": "local", "url": receiver.url}], "poll_interval": poll}
            )
            rows[f"outbox, poll {poll:g} s"] = run(
                store, settings, arrivals, args.events, args.rate, f"poll{poll}"
            )
        inline = []
        with httpx.Client() as client:
            for i in range(min(args.events, 200)):
                start = time.perf_counter()
                client.post(receiver.url, json={"key": f"inline:{i}"})
                inline.append((time.perf_counter() - start) * 1000)
        rows["inline POST (no outbox)"] = inline
    finally:
        receiver.close()
        store.close()
    backend = url.split(":", 1)[0]
    print(f"{args.events} events at {args.rate:g}/s over 4 rollouts, {backend}, local receiver")
    print(f"{'delivery':<26} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'delivered':>10}")
    for label, values in rows.items():
        print(
            f"{label:<26} {statistics.median(values):>8.1f} {percentile(values, 99):>8.1f} "
            f"{max(values):>8.1f} {len(values):>10}"
        )


if __name__ == "__main__":
    main()
