"""The config's operations sections: `notifications:`, a stage's `approval:` and `console:`.

Kept apart from `controller/config.py` so the parts that run the operations surface
(the outbox dispatcher, the approval gate, the console) can be read with their settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from workers.config import Duration, Strict

SEVERITIES = ("info", "warning", "critical")
EVENT_KINDS = ("transition", "verdict", "slice", "fallback_storm", "approval")
Severity = Literal["info", "warning", "critical"]
EventKind = Literal["transition", "verdict", "slice", "fallback_storm", "approval"]


class ReceiverConfig(Strict):
    """One webhook: what it hears (kinds at or above a severity) and in which body shape."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: str
    events: list[EventKind] = Field(default_factory=lambda: list(EVENT_KINDS))
    min_severity: Severity = "info"
    format: Literal["generic", "slack"] = "generic"
    timeout: Duration = Field(5.0, gt=0, description="one delivery attempt")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url {value!r} is not http:// or https://")
        return value

    def wants(self, kind: str, severity: str) -> bool:
        return kind in self.events and SEVERITIES.index(severity) >= SEVERITIES.index(
            self.min_severity
        )


class FallbackStormConfig(Strict):
    """When a rollout's route answers from its fallback model often enough to tell someone."""

    window: Duration = Field(60.0, gt=0)
    min_fallbacks: int = Field(10, ge=1)
    share: float = Field(0.2, gt=0, le=1, description="of the route's answered requests")


class NotificationsConfig(Strict):
    receivers: list[ReceiverConfig] = []
    initial_backoff: Duration = Field(1.0, gt=0)
    max_backoff: Duration = Field(60.0, gt=0)
    poll_interval: Duration = Field(0.5, gt=0, description="the dispatcher's wait for work")
    fallback_storm: FallbackStormConfig = FallbackStormConfig()

    @field_validator("receivers")
    @classmethod
    def _unique(cls, value: list[ReceiverConfig]) -> list[ReceiverConfig]:
        names = [r.name for r in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"receiver names must be unique; repeated: {', '.join(twice)}")
        return value


class ApprovalConfig(Strict):
    """A webhook that must answer `{"decision": "approve"}` before the stage advances.

    It is asked once per tick while the stage's other gates are met; `pending` keeps
    asking; `deny` holds the stage; no decision within `timeout` holds it too. Nothing but
    an approval (from the webhook, or `cutover approve` / the console) or an admin's
    `--force` lets the stage advance.
    """

    url: str
    timeout: Duration = Field(600.0, gt=0, description="from the first ask to a decision")
    request_timeout: Duration = Field(5.0, gt=0, description="one ask")


class ConsoleConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    page_size: int = Field(24, ge=1, le=500, description="pairs per gallery page")
