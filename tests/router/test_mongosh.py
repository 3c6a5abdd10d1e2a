"""mongosh, MongoDB's own shell, against the router's MongoDB front end: its start-up
conversation (buildInfo, getParameter, getLog, atlasVersion, connectionStatus, hello ...)
is answered well enough for it to connect, then an insert, a find and a count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from router.mongo.registry import REGISTRY
from tests.router.conftest import Deployment
from tests.router.mongo_front import MongoFront

MONGOSH = shutil.which("mongosh")
pytestmark = pytest.mark.skipif(MONGOSH is None, reason="mongosh is not on PATH "
                                "(.ci/run installs it with `npm install -g mongosh`)")


def mongosh(front: MongoFront, home: Path, script: str, *, db: str = "shardshift",
            user: str = "shardshift", password: str = "shardshift-local"
            ) -> subprocess.CompletedProcess[str]:
    assert MONGOSH is not None
    uri = f"mongodb://{user}:{password}@127.0.0.1:{front.port}/{db}?authSource=admin"
    return subprocess.run(
        [MONGOSH, "--quiet", "--norc", uri, "--eval", script],
        capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
             "MONGOSH_SKIP_NODE_VERSION_CHECK": "1", "DO_NOT_TRACK": "1"},
    )


def test_mongosh_inserts_finds_and_counts(mongo: MongoFront, deployment: Deployment,
                                          tmp_path: Path) -> None:
    c = deployment.collection
    count = ("db.runCommand({count: C, query: {acct: 'sh-1'}}).n" if "count" in REGISTRY
             else "null")
    script = f"""
const C = {json.dumps(c)};
const coll = db.getCollection(C);
const id = ObjectId();
const ins = coll.insertOne({{_id: id, acct: 'sh-1', n: NumberLong('5'), d: NumberDecimal('1.50'),
                             at: ISODate('2026-01-02T03:04:05Z'), tags: ['a', {{b: 1}}]}});
const got = coll.findOne({{acct: 'sh-1', _id: id}});
print(JSON.stringify({{acknowledged: ins.acknowledged, same: got._id.equals(id),
                       n: got.n.toString(), d: got.d.toString(), at: got.at.toISOString(),
                       tags: got.tags, count: {count}, db: db.getName()}}));
"""
    out = mongosh(mongo, tmp_path, script)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["acknowledged"] is True and seen["same"] is True
    assert (seen["n"], seen["d"], seen["at"]) == ("5", "1.50", "2026-01-02T03:04:05.000Z")
    assert seen["tags"] == ["a", {"b": 1}] and seen["db"] == "shardshift"
    if "count" in REGISTRY:
        assert seen["count"] == 1
    with mongo.client() as client:
        stored = client.shardshift[c].find_one({"acct": "sh-1"})
        assert stored is not None and stored["n"] == 5


def test_mongosh_with_a_wrong_password_fails_cleanly(mongo: MongoFront, tmp_path: Path) -> None:
    out = mongosh(mongo, tmp_path, "print('connected')", password="wrong")
    assert out.returncode != 0
    assert "Authentication failed" in out.stdout + out.stderr
    assert "connected" not in out.stdout
