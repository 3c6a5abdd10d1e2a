"""A raw MongoDB wire-protocol client for tests that send what no driver would."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import socket
import struct
from typing import Any

import bson

from router.mongo import wire

_ids = itertools.count(1000)


def op_msg(body: dict[str, Any], *, flags: int = 0, extra: bytes = b"") -> bytes:
    payload = struct.pack("<I", flags) + b"\x00" + bson.encode(body) + extra
    return wire.HEADER.pack(16 + len(payload), next(_ids), 0, wire.OP_MSG) + payload


def frame(op_code: int, payload: bytes, length: int | None = None) -> bytes:
    return wire.HEADER.pack(16 + len(payload) if length is None else length, next(_ids), 0,
                            op_code) + payload


class RawConn:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def reply(self) -> dict[str, Any] | None:
        """The next reply's document, or None when the server closed the connection."""
        header = self._exactly(16)
        if header is None:
            return None
        length, _, _, op = wire.HEADER.unpack(header)
        body = self._exactly(length - 16)
        if body is None:
            return None
        if op == wire.OP_MSG:
            return bson.decode(body[5:])
        return bson.decode(body[20:])  # OP_REPLY: flags, cursor id, from, count

    def closed(self) -> bool:
        """Has the server closed the connection (reads EOF)?"""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def command(self, body: dict[str, Any]) -> dict[str, Any]:
        self.send(op_msg(body))
        reply = self.reply()
        assert reply is not None, "the server closed the connection"
        return reply

    def login(self, user: str, password: str) -> None:
        """SCRAM-SHA-256 by hand (what a driver does)."""
        cnonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={user},r={cnonce}"
        r = self.command({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "$db": "admin",
                          "payload": ("n,," + first_bare).encode(),
                          "options": {"skipEmptyExchange": True}})
        assert r["ok"] == 1.0, r
        server_first = bytes(r["payload"]).decode()
        attrs = dict(p.split("=", 1) for p in server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(),
                                     base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth_msg = f"{first_bare},{server_first},{without_proof}".encode()
        sig = hmac.new(stored, auth_msg, hashlib.sha256).digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig, strict=True)))
        r = self.command({"saslContinue": 1, "conversationId": 1, "$db": "admin",
                          "payload": f"{without_proof},p={proof.decode()}".encode()})
        assert r["ok"] == 1.0 and r["done"], r
