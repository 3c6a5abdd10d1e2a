"""``shardshift router serve`` as a process of its own for tests, and the shape every error
response of the HTTP service must have (one JSON object, nothing of the deployment leaked)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from infra.net import free_port_block
from settings import REPO_ROOT

TOKEN = "shardshift-local"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1 << 20


class ServeProcess:
    """``python -m cli router serve`` with extra environment; stopped by the fixture."""

    def __init__(self, catalog_dsn: str, args: list[str], env: dict[str, str],
                 host: str = "127.0.0.1") -> None:
        self.port = free_port_block(1)
        self.args = ["--host", host, "--port", str(self.port), *args]
        self.env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": catalog_dsn,
                    "PYTHONPATH": str(REPO_ROOT), **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def run(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run to completion (for a configuration the command refuses)."""
        return subprocess.run([sys.executable, "-m", "cli", "router", "serve", *self.args],
                              env=self.env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, timeout: float = 60.0) -> ServeProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "router", "serve", *self.args],
            env=self.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError("router serve exited: " + "".join(self.log)[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)  # not listening yet
        raise RuntimeError(f"router serve did not listen within {timeout}s")

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.decode(errors="replace"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss(self) -> int:
        """The server process's peak resident set size so far (VmHWM), in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)


LEAKS = ("127.0.0.1", "localhost", "postgres", "psycopg", "user", "password", "passfile",
         "connection to server", "Traceback")


def assert_error_shape(r: httpx.Response, status: int, *ports: int) -> dict:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body, dict) and set(body) <= {"error", "type", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["type"], str) and body["type"]
    for word in LEAKS:
        assert word not in r.text.lower() if word.islower() else word not in r.text, (word, r.text)
    for port in ports:
        assert str(port) not in r.text, (port, r.text)
    return body


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key in ``directory`` (``openssl``)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=shardshift-test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    return cert, key
