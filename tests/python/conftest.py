"""Fixtures: a real sluice broker on a free 127.0.0.1 port with a temporary data directory."""

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def sluice_bin():
    if os.environ.get("SLUICE_BIN"):
        return os.environ["SLUICE_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return str(Path(target) / "debug" / "sluice")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_api_versions(port):
    """A Kafka ApiVersions v0 request gets an answer (a bare TCP connect is not enough)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.settimeout(1.0)
            # length 10 | api_key 18 | version 0 | correlation id 1 | client id null
            s.sendall(bytes([0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF]))
            head = s.recv(8)
            return len(head) >= 8 and head[4:8] == bytes([0, 0, 0, 1])
    except OSError:
        return False


class Broker:
    def __init__(self, cores=1, extra=()):
        self.tmp = tempfile.TemporaryDirectory(prefix="sluice-py-")
        self.data_dir = os.path.join(self.tmp.name, "data")
        self.log_path = os.path.join(self.tmp.name, "broker.stderr")
        self.cores = cores
        self.extra = list(extra)
        self.proc = None
        self.port = None
        for _ in range(5):
            self.port = free_port()
            if self._spawn():
                return
            self._kill()
        raise RuntimeError("broker did not start:\n" + self.stderr())

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"

    def stderr(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _spawn(self):
        binary = sluice_bin()
        if not os.path.exists(binary):
            raise RuntimeError(f"sluice binary not found at {binary}: build it with cargo build --bins")
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        self.proc = subprocess.Popen(
            [binary, "start", "--data-dir", self.data_dir, "--listen", self.bootstrap,
             "--cores", str(self.cores), *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if answers_api_versions(self.port):
                return True
            time.sleep(0.05)
        return False

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
        self.tmp.cleanup()


@pytest.fixture(scope="module")
def broker():
    b = Broker(cores=2 if (os.cpu_count() or 1) >= 2 else 1)
    yield b
    b.stop()
