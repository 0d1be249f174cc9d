"""The operations surface's threads beside a long-running command: the notification
dispatcher, and the console served by uvicorn (`cutover serve`, tests, benches)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from controller.config import Config
from controller.operations.dispatcher import Dispatcher
from controller.storage.store import Store


@dataclass
class ConsoleServer:
    """A uvicorn server in a thread of its own; `stop` ends it."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_console(config: Config, store: Store, host: str, port: int) -> ConsoleServer:
    """Start the console and return once it accepts connections."""
    import uvicorn

    from controller.operations.console import build_console

    server = uvicorn.Server(
        uvicorn.Config(build_console(config, store), host=host, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="cutover-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the console did not start on {host}:{port}")
        time.sleep(0.02)
    return ConsoleServer(server, thread, f"http://{host}:{port}")


@dataclass
class Notifier:
    dispatcher: Dispatcher
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Notifier:
        self.thread = threading.Thread(
            target=self.dispatcher.run, args=(self.stop_event,), name="cutover-notify", daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.dispatcher.close()


def start_notifier(config: Config, store: Store) -> Notifier:
    return Notifier(Dispatcher(store, config.notifications)).start()
