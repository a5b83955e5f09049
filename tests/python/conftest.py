"""Fixtures for the kafka-python tests: a real `sluice` broker on a free 127.0.0.1 port with a
temporary data dir, stopped (SIGTERM, then SIGKILL) when the test ends.

The binary is $SLUICE_BIN, else $CARGO_TARGET_DIR/debug/sluice, else target/debug/sluice
relative to the repository root.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_WAIT_S = 30
# Segment files are preallocated in extents of min(64 MiB, segment size): small segments keep
# each test's disk use low.
SEGMENT_BYTES = 8 << 20
STOP_WAIT_S = 20
REBALANCE_DELAY_FLAG = "--group-initial-rebalance-delay-ms"


def sluice_bin():
    if os.environ.get("SLUICE_BIN"):
        return os.environ["SLUICE_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO_ROOT, "target")
    if not os.path.isabs(target):
        target = os.path.join(REPO_ROOT, target)
    return os.path.join(target, "debug", "sluice")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_api_versions(port):
    """True once the broker answers ApiVersions v0 (a bare connect can hit a start-up window)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(2)
            s.sendall(struct.pack(">ihhih", 10, 18, 0, 0x5EED, -1))
            head = b""
            while len(head) < 8:
                chunk = s.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
            return struct.unpack(">ii", head)[1] == 0x5EED
    except OSError:
        return False


class Broker:
    def __init__(self, cores=1, extra_args=()):
        binary = sluice_bin()
        if not os.path.exists(binary):
            raise RuntimeError(f"sluice binary not found at {binary}: build it first (cargo build)")
        self.dir = tempfile.mkdtemp(prefix="sluice-pytest-")
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "stderr.log")
        # Kafka's default initial rebalance delay is 3 s; tests form groups at once unless
        # they set it themselves.
        delay_args = [] if REBALANCE_DELAY_FLAG in extra_args else [REBALANCE_DELAY_FLAG, "0"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "start", "--data-dir", os.path.join(self.dir, "data"),
             "--listen", self.bootstrap, "--cores", str(cores),
             "--segment-bytes", str(SEGMENT_BYTES), *delay_args, *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )
        deadline = time.monotonic() + START_WAIT_S
        while not answers_api_versions(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice exited during start-up: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sluice did not start within {START_WAIT_S}s: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def broker():
    """A fresh broker per test; two shards when the machine has two CPUs, so that partitions of
    one topic live on different cores."""
    b = Broker(cores=2 if (os.cpu_count() or 1) >= 2 else 1)
    yield b
    b.stop()


@pytest.fixture
def topic():
    return f"py-{uuid.uuid4().hex[:12]}"
