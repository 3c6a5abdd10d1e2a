"""Commands by name, and the state a command runs with.

A command module registers its handlers with ``@command("name")``; ``dispatch`` finds the
handler by the body's first key, checks authentication, and turns a ``MongoError`` (or a
router error, see ``errors_map``) into MongoDB's error reply. A handler returns the reply
document without ``ok`` (added here).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bson import Int64

from router.core import Router
from router.mongo.errors import MongoError
from router.mongo.errors_map import to_mongo_error
from settings import RouterSettings

log = logging.getLogger("shardshift.router.mongo")

SYSTEM_DATABASES = frozenset({"admin", "config", "local"})


@dataclass
class ServerContext:
    """What every connection of one front end shares."""

    router: Router
    settings: RouterSettings
    started_at: float
    state: dict[str, Any] = field(default_factory=dict)
    """Shared state of command modules (cursors, users...), each under its own key."""

    @property
    def database(self) -> str:
        return self.settings.mongo_database


@dataclass
class Session:
    """One client connection: who it is and what it is doing."""

    server: ServerContext
    conn_id: int
    peer: str
    user: str | None = None
    """The authenticated user; None until SCRAM completes."""
    conversation: Any = None
    """An authentication conversation in progress (``auth``)."""
    client_metadata: dict[str, Any] | None = None

    @property
    def router(self) -> Router:
        return self.server.router

    @property
    def settings(self) -> RouterSettings:
        return self.server.settings

    @property
    def authenticated(self) -> bool:
        return self.user is not None


Sequences = dict[str, list[dict[str, Any]]]
Handler = Callable[[Session, str, dict[str, Any], Sequences], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    auth: bool
    """Needs an authenticated connection (everything but the handshake)."""


REGISTRY: dict[str, Command] = {}


def command(*names: str, auth: bool = True) -> Callable[[Handler], Handler]:
    """Register a handler under one or more command names (MongoDB's are case-sensitive)."""
    def register(fn: Handler) -> Handler:
        for name in names:
            if name in REGISTRY:
                raise RuntimeError(f"command {name!r} registered twice")
            REGISTRY[name] = Command(name, fn, auth)
        return fn
    return register


def command_name(body: dict[str, Any]) -> str:
    for key in body:
        return str(key)
    raise MongoError("FailedToParse", "empty command document")


async def dispatch(session: Session, body: dict[str, Any], sequences: Sequences) -> dict[str, Any]:
    """Run one command; always returns a reply document (``ok`` 1 or 0)."""
    try:
        name = command_name(body)
        cmd = REGISTRY.get(name)
        if cmd is None:
            raise MongoError("CommandNotFound", f"no such command: '{name[:100]}'")
        if cmd.auth and not session.authenticated:
            raise MongoError("Unauthorized", f"command {name} requires authentication")
        db = body.get("$db")
        if not isinstance(db, str) or not db:
            raise MongoError("FailedToParse", "the command must name its database in '$db'")
        reply = await cmd.handler(session, db, body, sequences)
    except MongoError as exc:
        return exc.reply()
    except Exception as exc:
        err = to_mongo_error(exc)
        if err.code_name == "InternalError":
            log.exception("command failed on connection %d", session.conn_id)
        return err.reply()
    reply.setdefault("ok", 1.0)
    cursor = reply.get("cursor")
    if isinstance(cursor, dict) and type(cursor.get("id")) is int:
        # Cursor ids are int64 on the wire, whatever their value: drivers check the type
        # (the Node.js driver, and so mongosh, treats an int32 id as missing).
        cursor["id"] = Int64(cursor["id"])
    return reply
