"""API tokens: who may use the console and the admin API, and with which role.

A token is shown once, when it is created; only its SHA-256 is stored. A role is a
level: viewers read, operators also advance, pause, resume, roll back and decide
approvals, admins may also `--force`. The token's name is the actor in the audit trail.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from controller.storage.store import Store
from controller.storage.tables import ApiToken, utcnow

ROLES = ("viewer", "operator", "admin")
PREFIX = "cut_"


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def actor(self) -> str:
        """The audit trail's actor: marked as a token, so it never reads as an OS user."""
        return f"token:{self.name}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(store: Store, name: str, role: str, created_by: str) -> str:
    """A new token (returned once, never stored)."""
    if role not in ROLES:
        raise TokenError(f"role {role!r} is not one of {', '.join(ROLES)}")
    token = PREFIX + secrets.token_urlsafe(32)
    with store.session() as session:
        if session.scalars(select(ApiToken.id).where(ApiToken.name == name)).first():
            raise TokenError(f"a token named {name!r} exists; revoke it first or pick another name")
        session.add(
            ApiToken(
                name=name,
                role=role,
                token_hash=digest(token),
                created_by=created_by,
                created_at=utcnow(),
            )
        )
    return token


def revoke(store: Store, name: str) -> None:
    with store.session() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none()
        if row is None:
            raise TokenError(f"no token named {name!r}")
        row.revoked_at = row.revoked_at or utcnow()


def listed(store: Store) -> list[dict[str, str | None]]:
    with store.reader() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.name)).all()
        return [
            {
                "name": r.name,
                "role": r.role,
                "created_by": r.created_by,
                "created_at": r.created_at.isoformat(),
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            }
            for r in rows
        ]


def caller_of(store: Store, token: str | None) -> Caller | None:
    """The token's owner, or None for a missing, unknown or revoked token."""
    if not token:
        return None
    with store.reader() as session:
        row = session.scalars(
            select(ApiToken).where(ApiToken.token_hash == digest(token))
        ).one_or_none()
        if row is None or row.revoked_at is not None:
            return None
        return Caller(row.name, row.role)
