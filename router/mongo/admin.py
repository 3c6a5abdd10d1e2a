"""The handshake and the commands every driver and shell sends around the data."""

from __future__ import annotations

import datetime as dt
from typing import Any

from router.mongo import auth
from router.mongo.errors import MongoError
from router.mongo.registry import Sequences, Session, command

VERSION = "7.0.0"
"""The MongoDB server version this front end answers as: the command set and reply shapes it
follows (drivers pick features by ``maxWireVersion``)."""
MAX_WIRE_VERSION = 21  # MongoDB 7.0
MAX_WRITE_BATCH = 100_000


def hello_reply(s: Session, cmd: dict[str, Any], *, legacy: bool) -> dict[str, Any]:
    """The answer of a sharded cluster's router (``msg: "isdbgrid"``).

    ``logicalSessionTimeoutMinutes`` is left out on purpose: a driver then uses no sessions,
    so it attaches no transaction numbers and never repeats a write on its own (retryable
    writes). A write whose outcome is unknown is reported as an error with the label
    ``ShardshiftOutcomeUnknown`` instead; the application reads the document to find out.
    """
    settings = s.settings
    reply: dict[str, Any] = {
        ("ismaster" if legacy else "isWritablePrimary"): True,
        "msg": "isdbgrid",
        "maxBsonObjectSize": settings.max_document_bytes,
        "maxMessageSizeBytes": settings.mongo_max_message_bytes,
        "maxWriteBatchSize": MAX_WRITE_BATCH,
        "localTime": dt.datetime.now(dt.UTC),
        "connectionId": s.conn_id,
        "minWireVersion": 0,
        "maxWireVersion": MAX_WIRE_VERSION,
        "readOnly": False,
    }
    if cmd.get("helloOk"):
        reply["helloOk"] = True
    mechs = auth.supported_mechs(s.server, cmd.get("saslSupportedMechs"))
    if mechs is not None:
        reply["saslSupportedMechs"] = mechs
    if s.client_metadata is None and isinstance(cmd.get("client"), dict):
        s.client_metadata = cmd["client"]
    return reply


@command("hello", auth=False)
async def hello(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    return hello_reply(s, cmd, legacy=False)


@command("isMaster", "ismaster", auth=False)
async def is_master(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    return hello_reply(s, cmd, legacy=True)


@command("ping", auth=False)
async def ping(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    return {}


@command("buildInfo", "buildinfo")
async def build_info(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                     ) -> dict[str, Any]:
    major, minor, patch = (int(x) for x in VERSION.split("."))
    return {
        "version": VERSION, "versionArray": [major, minor, patch, 0],
        "gitVersion": "shardshift", "modules": ["shardshift"], "bits": 64,
        "maxBsonObjectSize": s.settings.max_document_bytes, "debug": False,
        "storageEngines": ["postgresql"],
    }


@command("endSessions")
async def end_sessions(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                       ) -> dict[str, Any]:
    return {}  # no server-side session state is kept (see hello_reply)


@command("connectionStatus")
async def connection_status(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                            ) -> dict[str, Any]:
    users = [{"user": s.user, "db": "admin"}] if s.user else []
    return {"authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": []}}


@command("whatsmyuri")
async def whats_my_uri(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                       ) -> dict[str, Any]:
    return {"you": s.peer}


# -- what shells and tools ask at start-up (mongosh: getParameter, getLog, ...) -------------------

FEATURE_COMPATIBILITY_VERSION = ".".join(VERSION.split(".")[:2])


def _parameters(s: Session) -> dict[str, Any]:
    """The server parameters ``getParameter`` reports (a router's few that clients read)."""
    return {
        "featureCompatibilityVersion": {"version": FEATURE_COMPATIBILITY_VERSION},
        "authenticationMechanisms": [auth.MECHANISM],
        "maxBSONObjectSize": s.settings.max_document_bytes,
    }


@command("getParameter")
async def get_parameter(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                        ) -> dict[str, Any]:
    """``{getParameter: 1, <name>: 1, ...}`` or ``{getParameter: "*"}``, as MongoDB answers:
    the named parameters it knows; none of them known is ``InvalidOptions``."""
    if db != "admin":
        raise MongoError("Unauthorized", "getParameter may only be run against the admin database.")
    known = _parameters(s)
    if cmd["getParameter"] == "*":
        return dict(known)
    wanted = [k for k in cmd if k not in ("getParameter", "comment") and not k.startswith("$")]
    found = {k: known[k] for k in wanted if k in known}
    if not found:
        raise MongoError("InvalidOptions", "no option found to get")
    return found


_LOGS = ("global", "startupWarnings")


@command("getLog")
async def get_log(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    """The router keeps no log in memory: every log is empty (``"*"`` lists their names)."""
    if db != "admin":
        raise MongoError("Unauthorized", "getLog may only be run against the admin database.")
    name = cmd["getLog"]
    if name == "*":
        return {"names": list(_LOGS)}
    if name not in _LOGS:
        raise MongoError("OperationFailed", f"no RamLog named: {str(name)[:64]}")
    return {"totalLinesWritten": 0, "log": []}


@command("getCmdLineOpts")
async def get_cmd_line_opts(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                            ) -> dict[str, Any]:
    if db != "admin":
        raise MongoError("Unauthorized",
                         "getCmdLineOpts may only be run against the admin database.")
    return {"argv": ["shardshift", "router", "serve"], "parsed": {}}
