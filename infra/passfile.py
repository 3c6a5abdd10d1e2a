"""The libpq passfile (``host:port:database:user:password`` per line, mode 0600).

Every database password of a deployment lives here and nowhere else: not in a DSN, a log
line, a workflow input or a history. libpq reads it by itself (``passfile=`` in the DSN, or
``PGPASSFILE``); this module only adds lines and looks them up the way libpq does (the first
line that matches wins, ``*`` matches anything).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def _split(line: str) -> list[str]:
    fields: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in line:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ":" and len(fields) < 4:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return fields


def _entries(passfile: Path) -> list[list[str]]:
    try:
        text = passfile.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = _split(line)
        if len(fields) == 5:
            out.append(fields)
    return out


def lookup(passfile: Path, host: str, port: int | str, user: str,
           dbname: str = "shardshift") -> str | None:
    """The password libpq would use for this connection, or None."""
    want = [host, str(port), dbname, user]
    for fields in _entries(passfile):
        if all(f in ("*", w) for f, w in zip(fields[:4], want, strict=True)):
            return fields[4]
    return None


@contextlib.contextmanager
def _locked(passfile: Path) -> Iterator[None]:
    lock = passfile.with_name(passfile.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_password(passfile: Path, host: str, port: int | str, user: str) -> str:
    """The password of ``user`` at ``host:port``: the passfile's, or a new random one added
    to it (a line for that host and port, any database). The file stays mode 0600."""
    with _locked(passfile):
        found = lookup(passfile, host, port, user)
        if found is not None:
            return found
        password = secrets.token_urlsafe(24)
        line = ":".join(_escape(f) for f in (host, str(port), "*", user, password)) + "\n"
        fd = os.open(passfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return password


def add_alias(passfile: Path, host: str, port: int | str, alias_port: int | str,
              alias_host: str | None = None) -> None:
    """Let every role of ``host:port`` log in through ``alias_host:alias_port`` too (a proxy
    or a connection pooler in front of the server, or its standby, which has the same roles):
    its lines, repeated for the alias (``alias_host`` defaults to ``host``)."""
    to_host = alias_host or host
    with _locked(passfile):
        have = {(f[0], f[1], f[3]) for f in _entries(passfile)}
        lines = [
            ":".join(_escape(x) for x in (to_host, str(alias_port), f[2], f[3], f[4])) + "\n"
            for f in _entries(passfile)
            if f[0] == host and f[1] == str(port) and (to_host, str(alias_port), f[3]) not in have
        ]
        if lines:
            fd = os.open(passfile, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)


__all__ = ["add_alias", "ensure_password", "lookup"]
