"""A real S3 API server for tests: moto's server mode in its own process.

moto's server speaks the S3 REST protocol over HTTP on loopback (any access key is accepted),
so the staging code talks to it through pyarrow's S3 client exactly as it would to an object
store; it stands in for a real one (AWS S3, MinIO, Ceph RGW, ...). Nothing is mocked in-process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from infra.net import free_port_block

ACCESS_KEY = "shardshift-test-key"
SECRET_KEY = "shardshift-test-secret"  # moto accepts any credentials
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """``host:port`` (plain HTTP)."""
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self, bucket: str, prefix: str) -> dict[str, str]:
        """Settings (environment) that point a shardshift process's staging here."""
        return {
            "SHARDSHIFT_STAGING_URL": f"s3://{bucket}/{prefix}",
            "SHARDSHIFT_S3__ENDPOINT_URL": self.url,
            "SHARDSHIFT_S3__REGION": REGION,
            "SHARDSHIFT_S3__ACCESS_KEY_ID": ACCESS_KEY,
            "SHARDSHIFT_S3__SECRET_ACCESS_KEY": SECRET_KEY,
        }


@contextmanager
def moto_server(deadline_s: float = 60.0) -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on a free loopback port; stop it on exit."""
    port = free_port_block(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start listening") from None
                time.sleep(0.1)
        yield S3Server(endpoint=f"127.0.0.1:{port}", process=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
