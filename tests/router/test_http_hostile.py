"""The router's HTTP service against hostile clients, as deployed: ``shardshift router serve``
in its own process (so its memory is its own to measure), over the session's real stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bson
import httpx
import psycopg
import pytest
from bson import json_util
from psycopg import sql

from infra import Stack
from infra.postgres import SUPERUSER
from router.core import cap_result
from router.hashing import khash
from router.http import max_body_bytes
from router.service import is_loopback
from settings import RouterSettings, as_role
from shards.codec import encode_value
from shards.postgres.schema import collection_table
from tests.conftest import refresh_session_catalogs
from tests.router.conftest import Deployment
from tests.router.serve import AUTH, MB, TOKEN, ServeProcess, assert_error_shape


@pytest.fixture(scope="module")
def server(catalog_dsn: str) -> Iterator[ServeProcess]:
    """The service with default settings (the development token, on loopback)."""
    s = ServeProcess(catalog_dsn, [], {})
    try:
        yield s.start()
    finally:
        s.stop()


class Body:
    """A chunked request body of ``total`` bytes that counts what the client got to send."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.sent = total, 0
        self._chunk = b"x" * chunk

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            self.sent += len(self._chunk)
            yield self._chunk


def _post_chunked(url: str, headers: dict[str, str], body: Body) -> httpx.Response:
    # A generator body has no length: httpx sends it with Transfer-Encoding: chunked.
    with httpx.Client(timeout=60) as c:
        return c.post(url, content=iter(body), headers={**headers,
                                                        "content-type": "application/json"})


@pytest.mark.parametrize(("headers", "status", "held"),
                         [({}, 401, 0), (AUTH, 413, max_body_bytes(RouterSettings()))],
                         ids=["no_token", "token"])
def test_a_50mb_chunked_body_is_refused_unread(
    server: ServeProcess, headers: dict[str, str], status: int, held: int
) -> None:
    """An unauthenticated 50 MB chunked POST gets 401 before its body is read; an
    authenticated one 413 as soon as it passes the limit. Either way the server's peak memory
    does not grow by anything near the body, and the client never got to send all of it."""
    # Warm up the paths the request takes (imports, first route lookups) before measuring.
    httpx.post(f"{server.url}/v1/collections/warm/find", json={"filter": {"a": 1}},
               headers=headers, timeout=30)
    before = server.peak_rss()
    body = Body(50 * MB)
    r = _post_chunked(f"{server.url}/v1/collections/anything/insert", headers, body)
    assert r.status_code == status, r.text[:300]
    grown = server.peak_rss() - before
    # 401: nothing of the body is held; 413: at most the body limit, then it stops reading.
    assert grown < held + 4 * MB, f"server peak RSS grew by {grown / MB:.1f} MB"
    assert body.sent < body.total, "the server read the whole 50 MB body"


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: ServeProcess) -> None:
    """A Content-Length over the limit is answered 413 from the headers alone."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/collections/x/insert HTTP/1.1\r\nHost: r\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = conn.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(body)["type"] == "RequestTooLarge"


# -- one error shape, and what error bodies never say --------------------------------------------

def test_every_error_status_has_one_shape(server: ServeProcess, deployment: Deployment) -> None:
    c = f"{server.url}/v1/collections/{deployment.collection}"
    with httpx.Client(timeout=30) as h:
        assert_error_shape(h.post(f"{c}/insert", json={"document": {}}), 401)
        assert_error_shape(h.post(f"{server.url}/v1/collections/nosuch/get", headers=AUTH,
                                  json={"key": 1, "id": 1}), 404)
        assert_error_shape(h.post(f"{server.url}/v1/nowhere", headers=AUTH, json={}), 404)
        assert_error_shape(h.get(f"{c}/insert", headers=AUTH), 405)
        assert_error_shape(h.post(f"{c}/insert", headers=AUTH,
                                  json={"document": {"_id": 1}}), 400)
        doc = {"_id": 1, "acct": "a"}
        assert h.post(f"{c}/insert", headers=AUTH, json={"document": doc}).status_code == 201
        assert_error_shape(h.post(f"{c}/insert", headers=AUTH, json={"document": doc}), 409)
        big = {"_id": 2, "acct": "a", "pad": "x" * (5 * MB)}
        assert_error_shape(h.post(f"{c}/insert", headers=AUTH, json={"document": big}), 413)
        body = assert_error_shape(h.post(f"{c}/insert", headers=AUTH, json={"doc": doc}), 422)
        assert {"loc", "msg", "type"} <= set(body["details"][0])
        assert "input" not in body["details"][0]  # the request is never echoed back
        assert_error_shape(h.post(f"{c}/insert", headers={**AUTH, "content-type":
                                  "application/json"}, content=b'{"document": {'), 422)


def _series(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_request_metrics_are_served_under_their_names(server: ServeProcess,
                                                      deployment: Deployment) -> None:
    """What a dashboard reads from ``/metrics``: each request counted once under
    ``http_server_request_duration_seconds`` by method, route and status (a 401 without a
    route), the requests in flight, and the routed operations."""
    c = f"{server.url}/v1/collections/{deployment.collection}"
    get = "/v1/collections/{collection}/get"
    route = {"http_request_method": "POST", "http_route": get}
    with httpx.Client(timeout=30) as h:
        def scrape() -> str:
            r = h.get(f"{server.url}/metrics", headers=AUTH)
            assert r.status_code == 200, r.text[:300]
            return r.text

        before = scrape()
        doc = {"_id": 7, "acct": "m"}
        assert h.post(f"{c}/insert", headers=AUTH, json={"document": doc}).status_code == 201
        for _ in range(3):
            r = h.post(f"{c}/get", headers=AUTH, json={"key": "m", "id": 7})
            assert r.json()["document"] == {"_id": {"$numberInt": "7"}, "acct": "m"}
        assert h.post(f"{c}/get", json={"key": "m", "id": 7}).status_code == 401
        assert h.post(f"{c}/get", headers=AUTH, json={"key": "m"}).status_code == 422
        after = scrape()

    def grew(name: str, **labels: str) -> float:
        return _series(after, name, **labels) - _series(before, name, **labels)

    count = "http_server_request_duration_seconds_count"
    assert grew(count, **route, http_response_status_code="200") == 3
    assert grew(count, **route, http_response_status_code="422") == 1
    assert grew(count, http_request_method="POST", http_response_status_code="401",
                http_route="") == 1
    assert grew(count, http_request_method="POST", http_route="/v1/collections/{collection}/insert",
                http_response_status_code="201") == 1
    assert grew("http_server_request_duration_seconds_bucket", **route,
                http_response_status_code="200", le="+Inf") == 3
    assert grew("http_server_request_duration_seconds_sum", **route,
                http_response_status_code="200") > 0
    # The scrape itself is the one GET in flight while /metrics is collected.
    assert _series(after, "http_server_active_requests", http_request_method="GET") == 1
    assert _series(after, "http_server_active_requests", http_request_method="POST") == 0
    assert grew("shardshift_router_operation_duration_seconds_count", op="get",
                outcome="ok") == 3


def test_openapi_documents_every_error_status(server: ServeProcess) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    ops = [op for path, item in spec["paths"].items() if path.startswith("/v1/")
           for op in item.values()]
    assert len(ops) == 6
    for op in ops:
        for status in ("401", "404", "413", "422", "502", "503", "504"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (status, schema)
    assert "409" in spec["paths"]["/v1/collections/{collection}/insert"]["post"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def _keys_on(deployment: Deployment, shard_id: str, n: int) -> list[str]:
    keys = (f"k-{i}" for i in range(10_000))
    return [k for k in keys if deployment.initial.locate(khash(k)).shard_id == shard_id][:n]


TIGHT = {
    "SHARDSHIFT_ROUTER__RETRY_DEADLINE_S": "1",
    "SHARDSHIFT_ROUTER__HTTP_REQUEST_TIMEOUT_S": "3",
    "SHARDSHIFT_ROUTER__HTTP_MAX_IN_FLIGHT": "1",
    "SHARDSHIFT_ROUTER__MAX_DOCUMENT_BYTES": str(16 * 1024),
    "SHARDSHIFT_ROUTER__FIND_MAX_RESULT_BYTES": str(32 * 1024),
}
"""Small limits: a 1 s retry deadline, a 3 s request time limit, one request in flight, 16 KiB
documents and a 32 KiB find result."""


@pytest.fixture(scope="module")
def tight(catalog_dsn: str) -> Iterator[ServeProcess]:
    s = ServeProcess(catalog_dsn, [], TIGHT)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def own_tight(catalog_dsn: str) -> Iterator[ServeProcess]:
    """A service of its own, for a test that stops the catalog under it."""
    s = ServeProcess(catalog_dsn, [], TIGHT)
    try:
        yield s.start()
    finally:
        s.stop()


async def test_a_stopped_shard_or_catalog_leaks_nothing(
    stack: Stack, own_tight: ServeProcess, deployment: Deployment, catalog_dsn: str
) -> None:
    """503 bodies (and the open /readyz) say what is unavailable, never where: no host, port,
    user or driver text. The cause is in the server's log."""
    c = f"{own_tight.url}/v1/collections/{deployment.collection}"
    sid = deployment.initial.chunks[0].shard_id
    (key,) = _keys_on(deployment, sid, 1)
    shard_pg = stack.instance_for_dsn(deployment.shards[sid].dsn)
    catalog_pg = stack.instance_for_dsn(catalog_dsn)
    ports = (shard_pg.port, catalog_pg.port)
    async with httpx.AsyncClient(timeout=30) as h:
        r = await h.post(f"{c}/insert", headers=AUTH, json={"document": {"_id": 1, "acct": key}})
        assert r.status_code == 201, r.text
        await asyncio.to_thread(shard_pg.stop, 30)
        try:
            for op, body in (("get", {"key": key, "id": 1}),
                             ("insert", {"document": {"_id": 2, "acct": key}}),
                             ("find", {"filter": {"email": "e"}})):
                r = await h.post(f"{c}/{op}", headers=AUTH, json=body)
                assert assert_error_shape(r, 503, *ports)["type"] == "ShardUnavailableError"
                assert int(r.headers["retry-after"]) >= 1
        finally:
            await asyncio.to_thread(shard_pg.start, 60)
        await asyncio.to_thread(catalog_pg.stop, 30)
        try:
            r = await h.get(f"{own_tight.url}/readyz")
            assert assert_error_shape(r, 503, *ports)["type"] == "NotReady"
            r = await h.post(f"{own_tight.url}/v1/collections/{deployment.collection}x/get",
                             headers=AUTH, json={"key": key, "id": 1})
            assert assert_error_shape(r, 503, *ports)["type"] == "RouteUnavailableError"
        finally:
            await asyncio.to_thread(catalog_pg.start, 60)
            await refresh_session_catalogs()  # every session catalog pool: drop dead links
    log = "".join(own_tight.log)
    assert str(catalog_pg.port) in log or str(shard_pg.port) in log, log[-3000:]


# -- limits that bound one request's cost ------------------------------------------------------


def _waiting_on_lock(dsn: str) -> bool:
    # As the superuser: another role's wait events are hidden from the mover (no
    # pg_read_all_stats), so the router's blocked statement would never show.
    with psycopg.connect(as_role(dsn, SUPERUSER), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                           " AND backend_type = 'client backend'").fetchone()
        return bool(row and row[0])


def test_a_request_over_the_time_limit_is_504_and_the_slot_is_freed(
    tight: ServeProcess, deployment: Deployment
) -> None:
    """A replace stuck behind a table lock is stopped at the request time limit (504 in the
    one shape; its statement is cancelled on the shard, so it did not apply); meanwhile a
    second request finds the one slot taken (503); afterwards the service serves again."""
    c = f"{tight.url}/v1/collections/{deployment.collection}"
    sid = deployment.initial.chunks[0].shard_id
    (key,) = _keys_on(deployment, sid, 1)
    dsn = deployment.shards[sid].dsn
    with httpx.Client(timeout=30) as h:
        assert h.post(f"{c}/insert", headers=AUTH,
                      json={"document": {"_id": 1, "acct": key, "v": 0}}).status_code == 201
        with psycopg.connect(dsn) as locker:
            locker.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                collection_table(deployment.collection)))
            result: dict[str, httpx.Response] = {}

            def blocked() -> None:
                with httpx.Client(timeout=30) as h2:
                    result["r"] = h2.post(f"{c}/replace", headers=AUTH,
                                          json={"document": {"_id": 1, "acct": key, "v": 1}})

            t = threading.Thread(target=blocked)
            t.start()
            deadline = time.monotonic() + 20
            while not _waiting_on_lock(dsn):
                assert time.monotonic() < deadline, "the replace never reached the lock"
                time.sleep(0.05)
            busy = h.post(f"{c}/get", headers=AUTH, json={"key": key, "id": 1})
            assert assert_error_shape(busy, 503)["type"] == "Overloaded"
            t.join(30)
            assert_error_shape(result["r"], 504)
            assert not _waiting_on_lock(dsn), "the stopped statement still waits on the shard"
            locker.rollback()
        r = h.post(f"{c}/get", headers=AUTH, json={"key": key, "id": 1})
        assert r.status_code == 200, r.text
        assert json_util.loads(r.text)["document"]["v"] == 0  # the stopped replace did not apply
        r = h.post(f"{c}/replace", headers=AUTH,
                   json={"document": {"_id": 1, "acct": key, "v": 2}})
        assert r.json() == {"matched": True}


def test_find_result_is_capped_and_says_so(tight: ServeProcess, deployment: Deployment) -> None:
    """A scatter find whose matches exceed ``find_max_result_bytes`` returns the first ones
    that fit, in order, with ``truncated``; a small one is whole and not truncated."""
    c = f"{tight.url}/v1/collections/{deployment.collection}"
    pad = "x" * 6000
    with httpx.Client(timeout=30) as h:
        for i in range(12):
            doc = {"_id": i, "acct": f"a-{i}", "email": "same@x", "pad": pad}
            assert h.post(f"{c}/insert", headers=AUTH, json={"document": doc}).status_code == 201
        r = h.post(f"{c}/find", headers=AUTH, json={"filter": {"email": "same@x"}})
        assert r.status_code == 200, r.text
        got = json_util.loads(r.text)
        assert got["truncated"] is True
        docs = got["documents"]
        assert 0 < len(docs) < 12
        assert sum(len(bson.encode(d)) for d in docs) <= 32 * 1024
        order = sorted(range(12), key=lambda i: (khash(f"a-{i}"), encode_value(i)))
        assert [d["_id"] for d in docs] == order[:len(docs)]
        r = h.post(f"{c}/find", headers=AUTH, json={"filter": {"email": "same@x"}, "limit": 2})
        assert r.json()["truncated"] is False and len(r.json()["documents"]) == 2


# -- `router serve`: the development token stays on loopback; TLS -----------------------------


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1",
                                            "no-such-host.invalid"))


def test_serve_refuses_the_development_token_off_loopback(catalog_dsn: str) -> None:
    s = ServeProcess(catalog_dsn, [], {}, host="0.0.0.0")
    s.env.pop("SHARDSHIFT_ROUTER__HTTP_TOKENS", None)
    done = s.run()
    assert done.returncode == 2, done.stderr
    assert "SHARDSHIFT_ROUTER__HTTP_TOKENS" in done.stderr
    assert "development token" in done.stderr
    assert "Traceback" not in done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", s.port)) != 0, "something listens anyway"
    half = ServeProcess(catalog_dsn, ["--tls-cert", "/nonexistent.pem"], {})
    done = half.run()
    assert done.returncode == 2 and "--tls-key" in done.stderr, done.stderr


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key (the ``openssl`` command)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=shardshift-test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    return cert, key


def test_serve_with_own_token_and_tls_on_all_interfaces(
    catalog_dsn: str, self_signed: tuple[Path, Path], deployment: Deployment
) -> None:
    """Off loopback with a token of the operator's own and TLS: a client that trusts the
    certificate is served with that token, the development token gets 401, and neither a
    client that does not trust the certificate nor plain HTTP gets an answer."""
    cert, key = self_signed
    token = "t-" + os.urandom(16).hex()
    s = ServeProcess(catalog_dsn, ["--tls-cert", str(cert), "--tls-key", str(key)],
                     {"SHARDSHIFT_ROUTER__HTTP_TOKENS": json.dumps([token])}, host="0.0.0.0")
    s.start()
    try:
        base = f"https://127.0.0.1:{s.port}"
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust, timeout=30) as h:
            assert h.get(f"{base}/healthz").json() == {"status": "ok"}
            c = f"{base}/v1/collections/{deployment.collection}"
            r = h.post(f"{c}/insert", headers={"Authorization": f"Bearer {token}"},
                       json={"document": {"_id": 1, "acct": "a"}})
            assert r.status_code == 201, r.text
            r = h.post(f"{c}/get", headers=AUTH, json={"key": "a", "id": 1})
            assert r.status_code == 401
        with pytest.raises(httpx.ConnectError), httpx.Client(timeout=30) as h:
            h.get(f"{base}/healthz")  # the system's CAs do not vouch for it
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as h:
            h.get(f"http://127.0.0.1:{s.port}/healthz")
    finally:
        s.stop()


def test_cap_result_keeps_the_longest_prefix_that_fits() -> None:
    docs = [{"_id": i, "pad": "x" * 100} for i in range(5)]
    size = len(bson.encode(docs[0]))
    assert cap_result(docs, 5 * size) == docs and not cap_result(docs, 5 * size).truncated
    capped = cap_result(docs, 3 * size + size // 2)
    assert capped == docs[:3] and capped.truncated
    assert cap_result([], 1).truncated is False
    with pytest.raises(ValueError, match="find_max_result_bytes"):
        RouterSettings(max_document_bytes=1 << 20, find_max_result_bytes=1 << 19)
    with pytest.raises(ValueError):
        RouterSettings(http_tokens=[])
