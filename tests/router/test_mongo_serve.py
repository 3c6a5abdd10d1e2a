"""``shardshift router serve --mongo-port`` as a process: a MongoDB driver connects and works;
off loopback the development user is refused (exit 2, nothing listens); with
``--tls-cert/--tls-key`` the MongoDB port speaks TLS only, to users from settings."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from infra.net import free_port_block
from tests.router.conftest import Deployment
from tests.router.serve import ServeProcess, self_signed_cert

OPTS = {"serverSelectionTimeoutMS": 5000, "tz_aware": True, "uuidRepresentation": "standard"}


def test_pymongo_through_router_serve(catalog_dsn: str, deployment: Deployment) -> None:
    port = free_port_block(1)
    s = ServeProcess(catalog_dsn, ["--mongo-port", str(port)], {}).start()
    try:
        uri = f"mongodb://shardshift:shardshift-local@127.0.0.1:{port}/?authSource=admin"
        with pymongo.MongoClient(uri, **OPTS) as client:
            assert client.admin.command("hello")["msg"] == "isdbgrid"
            coll = client.shardshift[deployment.collection]
            doc = {"_id": ObjectId(), "acct": "srv-1", "amount": Decimal128("9.99"),
                   "n": Int64(2**40), "at": dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
                   "items": [{"sku": "a", "qty": 2}]}
            coll.insert_one(doc)
            assert coll.find_one({"acct": "srv-1", "_id": doc["_id"]}) == doc
            assert coll.update_one({"acct": "srv-1", "_id": doc["_id"]},
                                   {"$inc": {"n": 1}}).modified_count == 1
            assert coll.find_one({"acct": "srv-1", "_id": doc["_id"]})["n"] == 2**40 + 1
        assert any("MongoDB front end on 127.0.0.1:" in line for line in s.log), s.log
    finally:
        s.stop()


def test_serve_refuses_the_development_user_off_loopback(catalog_dsn: str) -> None:
    port = free_port_block(1)
    s = ServeProcess(catalog_dsn, ["--mongo-port", str(port)],
                     {"SHARDSHIFT_ROUTER__HTTP_TOKENS": json.dumps(["t-" + os.urandom(16).hex()])},
                     host="0.0.0.0")
    s.env.pop("SHARDSHIFT_ROUTER__MONGO_USERS", None)
    done = s.run()
    assert done.returncode == 2, done.stderr
    assert "SHARDSHIFT_ROUTER__MONGO_USERS" in done.stderr
    assert "development user" in done.stderr and "Traceback" not in done.stderr
    for p in (port, s.port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", p)) != 0, "something listens anyway"


def test_serve_mongo_tls_with_users_from_settings(catalog_dsn: str, tmp_path: Path,
                                                  deployment: Deployment) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port_block(1)
    password = "p-" + os.urandom(16).hex()
    s = ServeProcess(catalog_dsn, ["--mongo-port", str(port), "--tls-cert", str(cert),
                                   "--tls-key", str(key)],
                     {"SHARDSHIFT_ROUTER__HTTP_TOKENS": json.dumps(["t-" + os.urandom(16).hex()]),
                      "SHARDSHIFT_ROUTER__MONGO_USERS": json.dumps(
                          [{"name": "app", "password": password}])},
                     host="0.0.0.0").start()
    try:
        base = f"127.0.0.1:{port}/?authSource=admin"
        with pymongo.MongoClient(f"mongodb://app:{password}@{base}", tls=True,
                                 tlsCAFile=str(cert), **OPTS) as client:
            coll = client.shardshift[deployment.collection]
            coll.insert_one({"_id": 7, "acct": "tls-1", "v": Decimal128("1.5")})
            assert coll.find_one({"acct": "tls-1", "_id": 7}) == {
                "_id": 7, "acct": "tls-1", "v": Decimal128("1.5")}
        with pymongo.MongoClient(f"mongodb://shardshift:shardshift-local@{base}", tls=True,
                                 tlsCAFile=str(cert), **OPTS) as dev, \
                pytest.raises(OperationFailure) as refused:
            dev.admin.command("ping")
        # An unknown user gets no saslSupportedMechs, so the driver falls back to SCRAM-SHA-1,
        # which is not offered (MechanismUnavailable), as on a MongoDB server without it.
        assert refused.value.code in (18, 334), refused.value
        plain_opts = {**OPTS, "serverSelectionTimeoutMS": 1500}
        with pymongo.MongoClient(f"mongodb://app:{password}@{base}", **plain_opts) as plain, \
                pytest.raises(ServerSelectionTimeoutError):
            plain.admin.command("ping")  # no TLS: the server does not speak to it
        with pymongo.MongoClient(f"mongodb://app:{password}@{base}", tls=True,
                                 **plain_opts) as untrusted, \
                pytest.raises(ServerSelectionTimeoutError):
            untrusted.admin.command("ping")  # the system's CAs do not vouch for the cert
    finally:
        s.stop()
