#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (librdkafka, raw protocol, CLI, kcat)
# and the kafka-python tests. Installs what it needs on a fresh Debian-like machine (as root).
# Exits non-zero if anything fails and ends with one summary line.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
PYTHON="${PYTHON:-python3}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

# --- tools ---------------------------------------------------------------------------------
# Debian packages, by the command each provides: kcat for tests/kcat.rs, systemd-analyze
# (package systemd) for tests/deploy.rs, node and npm for the JavaScript tests (tests/js),
# iptables for the network-partition test (tests/cluster.rs).
apt_missing=()
command -v kcat >/dev/null 2>&1 || apt_missing+=(kcat)
command -v iptables >/dev/null 2>&1 || apt_missing+=(iptables)
command -v systemd-analyze >/dev/null 2>&1 || apt_missing+=(systemd)
command -v node >/dev/null 2>&1 || apt_missing+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_missing+=(npm)
# Headers and tools to build librdkafka's own test suite (tests/librdkafka).
for pkg in make gcc g++ zlib1g-dev libzstd-dev rapidjson-dev libssl-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$pkg")
done
if [ "${#apt_missing[@]}" -gt 0 ]; then
    echo "run.sh: installing ${apt_missing[*]}"
    as_root apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" \
        || { echo "run.sh: cannot install ${apt_missing[*]}"; exit 1; }
fi
py_missing=()
"$PYTHON" -c 'import kafka, sys; sys.exit(0 if kafka.__version__ == "3.0.12" else 1)' 2>/dev/null \
    || py_missing+=("kafka-python==3.0.12")
"$PYTHON" -c 'import pytest' 2>/dev/null || py_missing+=("pytest==9.2.0")
# librdkafka through its Python binding: the transaction tests (tests/python/test_transactions.py).
"$PYTHON" -c 'import confluent_kafka, sys; sys.exit(0 if confluent_kafka.version()[0] == "2.16.1" else 1)' \
    2>/dev/null || py_missing+=("confluent-kafka==2.16.1")
# aiokafka (asyncio, its own protocol code) for tests/python/test_aiokafka_transactions.py.
"$PYTHON" -c 'import aiokafka, sys; sys.exit(0 if aiokafka.__version__ == "0.14.0" else 1)' \
    2>/dev/null || py_missing+=("aiokafka==0.14.0")
"$PYTHON" -c 'import snappy' 2>/dev/null || py_missing+=("python-snappy==0.7.3" "cramjam==2.14.0")
"$PYTHON" -c 'import lz4' 2>/dev/null || py_missing+=("lz4==4.4.5")
"$PYTHON" -c 'import zstandard' 2>/dev/null || py_missing+=("zstandard==0.25.0")
# The JavaScript client, pinned by tests/js/package-lock.json.
if [ ! -d tests/js/node_modules/kafkajs ]; then
    echo "run.sh: npm ci (tests/js)"
    (cd tests/js && npm ci --no-audit --no-fund -q) || { echo "run.sh: cannot install the JavaScript client"; exit 1; }
fi
"$PYTHON" -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("prometheus-client") == "0.26.0" else 1)' \
    2>/dev/null || py_missing+=("prometheus-client==0.26.0")
# confluent-kafka (librdkafka) for KIP-848 consumer groups (group.protocol=consumer).
"$PYTHON" -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("confluent-kafka") == "2.16.1" else 1)' \
    2>/dev/null || py_missing+=("confluent-kafka==2.16.1")
if [ "${#py_missing[@]}" -gt 0 ]; then
    echo "run.sh: pip install ${py_missing[*]}"
    "$PYTHON" -m pip install -q "${py_missing[@]}" \
        || "$PYTHON" -m pip install -q --break-system-packages "${py_missing[@]}" \
        || { echo "run.sh: cannot install Python packages"; exit 1; }
fi

# --- build ---------------------------------------------------------------------------------
echo "run.sh: cargo build --workspace --bins"
build_json="$(mktemp)"
trap 'rm -f "$build_json"' EXIT
cargo build --workspace --bins --message-format=json-render-diagnostics >"$build_json" \
    || { echo "SUMMARY: FAILED (build)"; exit 1; }
# The Python tests run the binary cargo just built (ask cargo where it put it).
built_bin="$("$PYTHON" -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "sluice" and m.get("executable"):
        print(m["executable"])
' "$build_json" | tail -n1)"
PY_SLUICE_BIN="${SLUICE_BIN:-${built_bin:-$CARGO_TARGET_DIR/debug/sluice}}"

# --- Rust tests ----------------------------------------------------------------------------
# The full-disk test mounts a small ext4 image on a loop device: it needs root and loop devices.
# Where both are available it must run (and pass); elsewhere it reports that it did not run.
loop_note="full-disk test: not run (needs root and loop devices)"
loop_probe() { # mounts and unmounts a tiny ext4 image: the test's own steps
    local d rc=1
    d="$(mktemp -d)" || return 1
    if truncate -s 8M "$d/img" && mkfs.ext4 -q -F "$d/img" >/dev/null 2>&1 && mkdir "$d/m" \
        && mount -o loop "$d/img" "$d/m" >/dev/null 2>&1; then
        umount "$d/m" && rc=0
    fi
    rm -rf "$d"
    return $rc
}
if [ "$(id -u)" -eq 0 ] && command -v mkfs.ext4 >/dev/null && loop_probe; then
    export SLUICE_LOOP_TESTS=1
    loop_note="full-disk test: ran"
fi
echo "run.sh: $loop_note"
# The network-partition test (tests/cluster.rs) drops packets between the cluster's loopback
# addresses with iptables: it needs root; elsewhere it reports that it did not run.
netpart_note="network-partition test: not run (needs root and iptables)"
if [ "$(id -u)" -eq 0 ] && iptables -w -n -L INPUT >/dev/null 2>&1; then
    netpart_note="network-partition test: ran"
fi
echo "run.sh: $netpart_note"
rust_rc=0
if cargo nextest --version >/dev/null 2>&1; then
    echo "run.sh: cargo nextest run --workspace"
    cargo nextest run --workspace --no-fail-fast || rust_rc=$?
else
    echo "run.sh: cargo test --workspace"
    cargo test --workspace --no-fail-fast || rust_rc=$?
fi

# --- Python tests --------------------------------------------------------------------------
echo "run.sh: $PYTHON -m pytest tests/python -q"
py_rc=0
SLUICE_BIN="$PY_SLUICE_BIN" "$PYTHON" -m pytest tests/python -q -p no:cacheprovider \
    -W ignore::DeprecationWarning || py_rc=$?

# --- librdkafka's own integration tests (the quick list) -----------------------------------
echo "run.sh: tests/librdkafka/run.sh (quick list)"
rdk_rc=0
SLUICE_BIN="$PY_SLUICE_BIN" bash tests/librdkafka/run.sh || rdk_rc=$?
echo "run.sh: tests/librdkafka/run.sh --consumer (quick list, group.protocol=consumer)"
SLUICE_BIN="$PY_SLUICE_BIN" bash tests/librdkafka/run.sh --consumer || rdk_rc=$?

# --- JavaScript tests ----------------------------------------------------------------------
echo "run.sh: node --test tests/js"
js_rc=0
SLUICE_BIN="$PY_SLUICE_BIN" node --test --test-concurrency=1 tests/js/*.test.mjs || js_rc=$?

if [ "$rust_rc" -eq 0 ] && [ "$py_rc" -eq 0 ] && [ "$js_rc" -eq 0 ] && [ "$rdk_rc" -eq 0 ]; then
    echo "SUMMARY: PASSED (rust tests ok, python tests ok, javascript tests ok, librdkafka suite ok; $loop_note; $netpart_note)"
    exit 0
fi
echo "SUMMARY: FAILED (rust tests exit $rust_rc, python tests exit $py_rc, javascript tests exit $js_rc, librdkafka suite exit $rdk_rc; $loop_note; $netpart_note)"
exit 1
