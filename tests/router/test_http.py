"""The router's HTTP face: auth, Extended JSON, bad input, and a schema-based fuzz."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import hypothesis
import pytest
import schemathesis
import uvicorn
from bson import json_util

from infra.net import free_port_block
from router.core import Router
from router.http import create_app, max_body_bytes
from router.service import build_app
from settings import RouterSettings, Settings
from shards.codec import JSON_OPTIONS
from tests.profiles import PARENT, examples
from tests.router.conftest import Deployment

TOKEN = "shardshift-local"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(router: Router):
    app = create_app(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        yield c


async def _total(deployment: Deployment) -> int:
    return sum([await s.count(deployment.collection) for s in deployment.shards.values()])


async def test_missing_or_wrong_token_is_401_and_touches_nothing(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    c = deployment.collection
    body = {"document": {"_id": 1, "acct": "a"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = await client.post(f"/v1/collections/{c}/insert", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert await _total(deployment) == 0
    assert (await client.get("/healthz")).status_code == 200


async def test_extended_json_round_trip(client: httpx.AsyncClient, deployment: Deployment) -> None:
    c = deployment.collection
    doc = {"_id": {"$oid": "6b0a4e15a1eb6a99b1b98cb6"}, "acct": "alice", "email": "a@x",
           "bal": {"$numberDecimal": "10.50"}, "n": {"$numberLong": "5"}}
    r = await client.post(f"/v1/collections/{c}/insert", json={"document": doc}, headers=AUTH)
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/collections/{c}/patch", headers=AUTH, json={
        "key": "alice", "id": {"$oid": "6b0a4e15a1eb6a99b1b98cb6"},
        "update": {"$inc": {"bal": {"$numberDecimal": "0.25"}, "n": 1}}})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/collections/{c}/get", headers=AUTH,
                          json={"key": "alice", "id": {"$oid": "6b0a4e15a1eb6a99b1b98cb6"}})
    got = r.json()["document"]
    assert got["bal"] == {"$numberDecimal": "10.75"}
    assert got["n"] == {"$numberLong": "6"}
    r = await client.post(f"/v1/collections/{c}/find", headers=AUTH, json={"filter": {"email": "a@x"}})
    assert [d["acct"] for d in r.json()["documents"]] == ["alice"]
    r = await client.post(f"/v1/collections/{c}/insert", json={"document": doc}, headers=AUTH)
    assert r.status_code == 409


async def test_uuids_round_trip(client: httpx.AsyncClient, deployment: Deployment) -> None:
    """A UUID (``$binary`` subtype 04) as ``_id`` and as a field is stored and read back as
    it was sent (it was refused with 400: the BSON size check could not encode a UUID)."""
    c = deployment.collection
    u = {"$binary": {"base64": "AQIDBAUGBwgJCgsMDQ4PEA==", "subType": "04"}}
    doc = {"_id": u, "acct": "uuid", "ref": u}
    r = await client.post(f"/v1/collections/{c}/insert", json={"document": doc}, headers=AUTH)
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/collections/{c}/get", headers=AUTH,
                          json={"key": "uuid", "id": u})
    assert r.status_code == 200, r.text
    assert r.json()["document"] == doc


async def test_get_answers_canonical_extended_json(client: httpx.AsyncClient,
                                                  deployment: Deployment) -> None:
    """A get answers the stored text when it is canonical already, and re-spells what the
    shard computed: the double 3.0 an ``$inc`` stored as "3" comes back as "3.0", the decimal
    it stored as "0.00000010" as "1.0E-7", as ``json_util`` writes them."""
    c = deployment.collection
    doc = {"_id": {"$oid": "6b0a4e15a1eb6a99b1b98cb7"}, "acct": "b\u00fcro \U0001f600",
           "at": {"$date": {"$numberLong": "1700000000123"}}, "n": {"$numberLong": "5"},
           "i": 1, "tags": ["x", None, True, {"deep": [1.5]}], "u": {"$binary": {
               "base64": "AAECAwQFBgcICQoLDA0ODw==", "subType": "00"}},
           "d": 1.5, "m": {"$numberDecimal": "0.00000005"}}
    r = await client.post(f"/v1/collections/{c}/insert", json={"document": doc}, headers=AUTH)
    assert r.status_code == 201, r.text
    ident = {"key": doc["acct"], "id": doc["_id"]}
    r = await client.post(f"/v1/collections/{c}/patch", headers=AUTH, json={
        **ident, "update": {"$inc": {"d": 1.5, "m": {"$numberDecimal": "0.00000005"}}}})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/collections/{c}/get", headers=AUTH, json=ident)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = r.json()["document"]
    assert got["d"] == {"$numberDouble": "3.0"}
    assert got["m"] == {"$numberDecimal": "1.0E-7"}
    assert got == json.loads(json_util.dumps(
        json_util.loads(json.dumps({**doc, "d": 3.0, "m": {"$numberDecimal": "1.0E-7"}}),
                        json_options=JSON_OPTIONS), json_options=JSON_OPTIONS))
    r = await client.post(f"/v1/collections/{c}/get", headers=AUTH, json={**ident, "id": 0})
    assert r.status_code == 200 and r.json() == {"document": None}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/collections/nosuch/insert", {"document": {"_id": 1, "acct": "a"}}, 404),
        ("/v1/collections/bad%22name/insert", {"document": {"_id": 1, "acct": "a"}}, 400),
        ("{c}/insert", {"document": {"_id": 1}}, 400),                      # no shard key
        ("{c}/insert", {"document": {"acct": "a"}}, 400),                   # no _id
        ("{c}/insert", {"doc": {"_id": 1, "acct": "a"}}, 422),              # wrong body
        ("{c}/insert", {"document": {"_id": 1, "acct": "a", "pad": "x" * (5 << 20)}}, 413),
        ("{c}/replace", {"document": {"_id": 1, "acct": "b"}, "key": "a"}, 400),  # key change
        ("{c}/patch", {"key": "a", "id": 1, "update": {"$set": {"acct": "b"}}}, 400),
        ("{c}/patch", {"key": "a", "id": 1, "update": {"$where": {"x": 1}}}, 400),
        ("{c}/find", {"filter": {"nope": 1}}, 400),
        ("{c}/find", {"filter": {}}, 400),
        ("{c}/find", {"filter": {"acct": "a"}, "limit": 0}, 422),
        ("{c}/get", {"key": {"$numberLong": "x"}, "id": 1}, 400),
    ],
)
async def test_bad_input_is_4xx_and_writes_nothing(
    client: httpx.AsyncClient, deployment: Deployment, path: str, body: dict, status: int
) -> None:
    url = path.replace("{c}", f"/v1/collections/{deployment.collection}")
    r = await client.post(url, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert await _total(deployment) == 0


async def test_malformed_json_is_422(client: httpx.AsyncClient, deployment: Deployment) -> None:
    r = await client.post(f"/v1/collections/{deployment.collection}/insert",
                          content=b'{"document": {', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422
    assert await _total(deployment) == 0


async def test_get_fast_path_answers_as_the_app_does(
    client: httpx.AsyncClient, deployment: Deployment
) -> None:
    """A get the guard answers itself (``fast_get``: ``content-type: application/json``, a
    body of exactly ``key`` and ``id``) gets the very bytes, status and headers the app's
    endpoint gives the same request (another content type takes the app's path): found,
    not found, an unknown collection, a bad Extended JSON value, a bad collection name."""
    c = deployment.collection
    doc = {"_id": {"$oid": "6b0a4e15a1eb6a99b1b98cb6"}, "acct": "zoë", "n": {"$numberLong": "5"}}
    r = await client.post(f"/v1/collections/{c}/insert", json={"document": doc}, headers=AUTH)
    assert r.status_code == 201, r.text
    cases = [
        (c, {"key": "zoë", "id": {"$oid": "6b0a4e15a1eb6a99b1b98cb6"}}),
        (c, {"key": "zoë", "id": 1}),
        ("no_such_collection", {"key": 1, "id": 1}),
        (c, {"key": {"$oid": "zz"}, "id": 1}),
        ("bad$name", {"key": 1, "id": 1}),
    ]
    for collection, body in cases:
        content = json.dumps(body).encode()
        answers = []
        for ctype in ("application/json", "application/json; charset=utf-8"):
            r = await client.post(f"/v1/collections/{collection}/get", content=content,
                                  headers={**AUTH, "content-type": ctype})
            answers.append((r.status_code, r.headers.get("content-type"),
                            r.headers.get("content-length"), r.content))
        assert answers[0] == answers[1], (collection, body, answers)
    assert answers[0][0] == 400 or answers[0][0] == 404  # the last case is refused


# -- schema-based fuzz against a real server --------------------------------------------------


@pytest.fixture
def http_server(deployment: Deployment, catalog_dsn: str) -> Iterator[str]:
    """The HTTP service under uvicorn in its own thread and event loop."""
    port = free_port_block(1)
    app = build_app(catalog_dsn, Settings())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _error_shape_problem(response) -> str | None:  # response: a requests/httpx response
    """Why an error response is not in the one error shape, or None."""
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not (isinstance(body, dict) and set(body) <= {"error", "type", "details"}
            and isinstance(body.get("error"), str) and isinstance(body.get("type"), str)):
        return f"not the error shape: {str(body)[:200]}"
    return None


def test_fuzz_finds_no_server_error(http_server: str, deployment: Deployment) -> None:
    """Schema-driven fuzz of every operation (schemathesis strategies, hypothesis engine).

    Each generated case is sent with the token (no 5xx; every error in the one shape),
    without it (401 for everything but the health endpoints), and, once per operation, padded
    past the body limit, declared and chunked (413). Half the cases are aimed at the real
    collection so they reach the shards.
    """
    api = schemathesis.openapi.from_url(f"{http_server}/openapi.json")
    limit = max_body_bytes(RouterSettings())
    failures: list[str] = []
    operations = 0
    oversized_ops: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        oversized_sent = False

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            PARENT, max_examples=examples(25, 400),
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def fuzz(case) -> None:  # case: a schemathesis Case
            nonlocal oversized_sent
            params = case.path_parameters or {}
            if "collection" in params and len(repr(case.body)) % 2 == 0:
                params["collection"] = deployment.collection
            where = f"{case.method} {case.formatted_path} {str(case.body)[:200]!r}"
            response = case.call(headers=AUTH)
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400 and (problem := _error_shape_problem(response)):
                failures.append(f"{where}: {response.status_code} {problem}")
            health = case.path in ("/healthz", "/readyz")
            bare = case.call(headers={"Authorization": "Bearer not-the-token"}
                             if len(repr(case.body)) % 3 == 0 else {})
            if not health and bare.status_code != 401:
                failures.append(f"{where} without a token: {bare.status_code}")
            if health or oversized_sent or case.method != "POST":
                return
            oversized_sent = True
            oversized_ops.append(case.path)
            url = f"{http_server}{case.formatted_path}"
            pad = b'{"pad": "' + b"x" * limit + b'"}'
            declared = httpx.post(url, content=pad, headers={
                **AUTH, "content-type": "application/json"}, timeout=60)
            chunked = httpx.post(url, content=iter([pad[:65536]] * (limit // 65536 + 2)),
                                 headers={**AUTH, "content-type": "application/json"},
                                 timeout=60)
            for how, r in (("declared", declared), ("chunked", chunked)):
                if r.status_code != 413 or _error_shape_problem(r):
                    failures.append(f"{where} oversized ({how}): {r.status_code} {r.text[:200]}")

        fuzz()
    assert operations >= 8
    assert len(oversized_ops) == 6, oversized_ops  # every /v1 operation
    assert not failures, "\n".join(failures[:10])
