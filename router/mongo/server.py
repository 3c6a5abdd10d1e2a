"""The MongoDB front end's connections: read a message, run its command, write the reply.

Limits are enforced from the 16-byte header, before the rest of a message is read: a message
longer than ``mongo_max_message_bytes`` (or, before the connection has authenticated,
``mongo_max_unauthenticated_bytes``) gets an error reply and the connection is closed, so a
hostile length costs no allocation. Then the message waits for room in a byte budget shared
by all connections (``mongo_max_in_flight_bytes``) before its body is read, and its body must
arrive within ``mongo_message_timeout_s``: many large or stalled messages cannot exhaust
memory. A message that cannot be parsed closes its connection (as MongoDB does); the process
and every other connection go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from typing import Any

from bson.errors import InvalidDocument

from router.core import Router
from router.mongo import admin, auth, find_and_modify, indexes, reads, wire, writes  # noqa: F401 - importing registers their commands
from router.mongo.errors import MongoError, ProtocolError
from router.mongo.index_ddl import STATE_KEY as INDEX_DDL
from router.mongo.index_ddl import IndexDdl
from router.mongo.registry import ServerContext, Session, dispatch
from settings import RouterSettings

log = logging.getLogger("shardshift.router.mongo")

_HANDSHAKE_OVER_OP_QUERY = frozenset({"hello", "isMaster", "ismaster"})


class ByteBudget:
    """Bytes of messages in flight across connections: ``take`` waits for room, ``give``
    returns it. (One event loop: the check and the update need no lock; only waiters wait.)"""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = asyncio.Condition()
        self._waiting = 0

    async def take(self, n: int) -> None:
        if self.used + n <= self.capacity:
            self.used += n
            return
        self._waiting += 1
        try:
            async with self._room:
                await self._room.wait_for(lambda: self.used + n <= self.capacity)
                self.used += n
        finally:
            self._waiting -= 1

    async def give(self, n: int) -> None:
        self.used -= n
        if self._waiting:
            async with self._room:
                self._room.notify_all()


class MongoServer:
    """Serves the MongoDB wire protocol over one ``Router`` (which the caller starts/closes)."""

    def __init__(self, router: Router, settings: RouterSettings, *,
                 ssl_context: ssl.SSLContext | None = None,
                 index_ddl: IndexDdl | None = None) -> None:
        self.context = ServerContext(router, settings, time.time())
        if index_ddl is not None:
            self.context.state[INDEX_DDL] = index_ddl
        self.settings = settings
        self.ssl_context = ssl_context
        self.host = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._reply_ids = itertools.count(1)
        self._connections: set[asyncio.Task[Any]] = set()
        self.budget = ByteBudget(settings.mongo_max_in_flight_bytes)
        auth.users(self.context)  # derive the SCRAM verifiers now, not on a client's time

    async def start(self, host: str = "127.0.0.1", port: int = 27017) -> MongoServer:
        self._server = await asyncio.start_server(self._accept, host, port,
                                                  ssl=self.ssl_context, limit=64 * 1024)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.settings.mongo_max_connections:
            log.warning("refusing a connection: %d already open", len(self._connections))
            writer.transport.abort()
            return
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        session = Session(self.context, next(self._ids),
                          f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
        try:
            await self._serve(session, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away: nothing to answer
        except asyncio.CancelledError:
            # The front end is closing (``close`` cancels every connection): this task is the
            # connection's own top level, so it ends here, quietly.
            return
        except ProtocolError as exc:
            log.info("closing connection %d from %s: %s", session.conn_id, session.peer, exc)
        except Exception:  # one connection's failure must not end the others: logged
            log.exception("connection %d from %s failed", session.conn_id, session.peer)
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _serve(self, s: Session, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            header = await reader.readexactly(wire.HEADER.size)
            length, request_id, _, op_code = wire.parse_header(header)
            limit = (min(self.settings.mongo_max_message_bytes, self.budget.capacity)
                     if s.authenticated else self.settings.mongo_max_unauthenticated_bytes)
            if length < wire.HEADER.size or length > limit:
                err = MongoError("BSONObjectTooLarge" if length > limit else "InvalidBSON",
                                 f"message length {length} is outside [16, {limit}]"
                                 + ("" if s.authenticated else " (not authenticated)"))
                await self._reply(writer, op_code, request_id, err.reply())
                raise ProtocolError(err.message)
            if op_code not in (wire.OP_MSG, wire.OP_QUERY):
                raise ProtocolError(f"unsupported opcode {op_code}")
            await self.budget.take(length)
            try:
                try:
                    async with asyncio.timeout(self.settings.mongo_message_timeout_s):
                        payload = await reader.readexactly(length - wire.HEADER.size)
                except TimeoutError:
                    raise ProtocolError(
                        f"a {length}-byte message did not arrive within "
                        f"{self.settings.mongo_message_timeout_s:g}s") from None
                if op_code == wire.OP_MSG:
                    req = wire.parse_op_msg(request_id, payload)
                else:
                    req = wire.parse_op_query(request_id, payload)
                del payload
                reply = await self._run(s, req)
            finally:
                await self.budget.give(length)
            if not req.more_to_come:
                await self._reply(writer, op_code, request_id, reply)

    async def _run(self, s: Session, req: wire.Request) -> dict[str, Any]:
        if req.op_code == wire.OP_QUERY:
            name = next(iter(req.body), "")
            if not req.namespace.endswith(".$cmd") or name not in _HANDSHAKE_OVER_OP_QUERY:
                return MongoError(
                    "CommandNotSupported",
                    "OP_QUERY serves only the hello/isMaster handshake; use OP_MSG").reply()
            body = {**req.body, "$db": req.namespace[: -len(".$cmd")] or "admin"}
            return await dispatch(s, body, {})
        return await dispatch(s, req.body, req.sequences)

    async def _reply(self, writer: asyncio.StreamWriter, op_code: int, request_id: int,
                     doc: dict[str, Any]) -> None:
        reply_id = next(self._reply_ids)
        build = wire.op_reply if op_code == wire.OP_QUERY else wire.op_msg_reply
        try:
            data = build(request_id, reply_id, doc)
        except (InvalidDocument, OverflowError, ValueError) as exc:
            log.error("a reply could not be encoded: %s", exc)
            data = build(request_id, reply_id, MongoError(
                "InternalError", "internal error (see the router's log)").reply())
        writer.write(data)
        if writer.transport.get_write_buffer_size() == 0:
            return  # all sent: nothing to wait for
        try:
            async with asyncio.timeout(self.settings.mongo_message_timeout_s):
                await writer.drain()
        except TimeoutError:
            raise ProtocolError(f"the client did not read a {len(data)}-byte reply within "
                                f"{self.settings.mongo_message_timeout_s:g}s") from None


@contextlib.asynccontextmanager
async def serving(router: Router, settings: RouterSettings, host: str = "127.0.0.1",
                  port: int = 0, *, ssl_context: ssl.SSLContext | None = None
                  ) -> Any:
    """A started front end over ``router`` (for tests and embedding); closed on exit."""
    server = await MongoServer(router, settings, ssl_context=ssl_context).start(host, port)
    try:
        yield server
    finally:
        await server.close()
