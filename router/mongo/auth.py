"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as MongoDB speaks it: ``saslStart`` / ``saslContinue``.

Users come from settings (``router.mongo_users``); each password is turned into its SCRAM
verifiers (salt, StoredKey, ServerKey) when the front end starts and is not kept. A failed
attempt says only "Authentication failed." whatever went wrong, so a client learns nothing
about which users exist. No channel binding (the client sends ``n,,``); TLS protects the
exchange on the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from bson.binary import Binary
from pymongo.saslprep import saslprep

from router.mongo.errors import MongoError
from router.mongo.registry import Sequences, ServerContext, Session, command
from settings import RouterSettings

MECHANISM = "SCRAM-SHA-256"
_STATE_KEY = "auth.users"
_FAILED = "Authentication failed."


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def make_verifier(password: str, iterations: int, salt: bytes | None = None) -> Verifier:
    salt = salt if salt is not None else secrets.token_bytes(28)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return Verifier(salt, iterations, hashlib.sha256(client_key).digest(),
                    _hmac(salted, b"Server Key"))


def load_users(settings: RouterSettings) -> dict[str, Verifier]:
    return {u.name: make_verifier(u.password.get_secret_value(), settings.mongo_scram_iterations)
            for u in settings.mongo_users}


def users(server: ServerContext) -> dict[str, Verifier]:
    found: dict[str, Verifier] | None = server.state.get(_STATE_KEY)
    if found is None:
        found = server.state[_STATE_KEY] = load_users(server.settings)
    return found


@dataclass
class Conversation:
    user: str
    verifier: Verifier
    client_first_bare: str
    server_first: str
    nonce: str
    skip_empty: bool = False
    """The client asked to skip the empty last step (``options.skipEmptyExchange``)."""
    proved: bool = False


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise MongoError("AuthenticationFailed", _FAILED)
        out.setdefault(part[0], part[2:])
    return out


def _payload(cmd: dict[str, Any]) -> str:
    raw = cmd.get("payload")
    if not isinstance(raw, bytes | bytearray) or len(raw) > 4096:
        raise MongoError("BadValue", "payload must be binary data of at most 4096 bytes")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MongoError("AuthenticationFailed", _FAILED) from None


def _unescape_user(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise MongoError("AuthenticationFailed", _FAILED)
    return name.replace("=2C", ",").replace("=3D", "=")


def start(server: ServerContext, mechanism: Any, message: str) -> tuple[Conversation, str]:
    """The server-first message for a client-first message."""
    if mechanism != MECHANISM:
        raise MongoError("MechanismUnavailable",
                         f"Received authentication for mechanism {str(mechanism)[:40]} which is "
                         f"not enabled (this router supports {MECHANISM})")
    if not message.startswith("n,"):
        # "y,"/"p=": channel binding, which this server does not offer.
        raise MongoError("AuthenticationFailed", _FAILED)
    gs2_end = message.find(",", 2)
    if gs2_end < 0:
        raise MongoError("AuthenticationFailed", _FAILED)
    bare = message[gs2_end + 1:]
    attrs = _attrs(bare)
    user, cnonce = _unescape_user(attrs.get("n", "")), attrs.get("r", "")
    if not cnonce or "m" in attrs:
        raise MongoError("AuthenticationFailed", _FAILED)
    verifier = users(server).get(user)
    if verifier is None:
        # Go on with a made-up verifier, so an unknown user fails where a wrong password does.
        verifier = make_verifier(secrets.token_urlsafe(16), 4096)
        user = ""
    nonce = cnonce + base64.b64encode(secrets.token_bytes(24)).decode()
    server_first = (f"r={nonce},s={base64.b64encode(verifier.salt).decode()},"
                    f"i={verifier.iterations}")
    return Conversation(user, verifier, bare, server_first, nonce), server_first


def finish(conv: Conversation, message: str) -> str:
    """The server-final message (``v=...``) when the client's proof holds."""
    attrs = _attrs(message)
    proof_at = message.rfind(",p=")
    if proof_at < 0 or attrs.get("r") != conv.nonce or attrs.get("c") != "biws":
        raise MongoError("AuthenticationFailed", _FAILED)
    without_proof = message[:proof_at]
    try:
        proof = base64.b64decode(attrs["p"], validate=True)
    except (ValueError, KeyError):
        raise MongoError("AuthenticationFailed", _FAILED) from None
    auth_message = f"{conv.client_first_bare},{conv.server_first},{without_proof}".encode()
    signature = _hmac(conv.verifier.stored_key, auth_message)
    if len(proof) != len(signature):
        raise MongoError("AuthenticationFailed", _FAILED)
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not conv.user or not hmac.compare_digest(hashlib.sha256(client_key).digest(),
                                                conv.verifier.stored_key):
        raise MongoError("AuthenticationFailed", _FAILED)
    conv.proved = True
    server_sig = _hmac(conv.verifier.server_key, auth_message)
    return "v=" + base64.b64encode(server_sig).decode()


@command("saslStart", auth=False)
async def sasl_start(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    s.conversation = None
    if db != "admin":
        raise MongoError("AuthenticationFailed", _FAILED)
    conv, server_first = start(s.server, cmd.get("mechanism"), _payload(cmd))
    options = cmd.get("options")
    conv.skip_empty = isinstance(options, dict) and bool(options.get("skipEmptyExchange"))
    s.conversation = conv
    return {"conversationId": 1, "done": False, "payload": Binary(server_first.encode())}


@command("saslContinue", auth=False)
async def sasl_continue(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences
                        ) -> dict[str, Any]:
    conv = s.conversation
    if not isinstance(conv, Conversation) or cmd.get("conversationId") != 1:
        s.conversation = None
        raise MongoError("AuthenticationFailed", _FAILED)
    if conv.proved:
        # The empty last step of a client that did not ask to skip it.
        s.conversation = None
        s.user = conv.user
        return {"conversationId": 1, "done": True, "payload": Binary(b"")}
    try:
        server_final = finish(conv, _payload(cmd))
    except MongoError:
        s.conversation = None
        raise
    if conv.skip_empty:
        s.conversation = None
        s.user = conv.user
        return {"conversationId": 1, "done": True, "payload": Binary(server_final.encode())}
    return {"conversationId": 1, "done": False, "payload": Binary(server_final.encode())}


def supported_mechs(server: ServerContext, spec: Any) -> list[str] | None:
    """``hello``'s ``saslSupportedMechs`` answer for ``"<db>.<user>"`` (None: leave it out)."""
    if not isinstance(spec, str) or "." not in spec:
        return None
    db, _, user = spec.partition(".")
    if db != "admin" or user not in users(server):
        return None
    return [MECHANISM]


@command("logout")
async def logout(s: Session, db: str, cmd: dict[str, Any], seqs: Sequences) -> dict[str, Any]:
    s.user = None
    return {}
