#!/usr/bin/env bash
# Runs every test: the Rust suites (unit, property, integration against the real binary) and the
# Python suite (kafka-python and kcat against a running broker). Installs kcat and the Python
# clients if they are missing. Exits non-zero if any suite failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kcat >/dev/null 2>&1; then
    apt-get update
    apt-get install -y kcat
fi
if ! python3 -c 'import kafka, pytest, lz4, zstandard, snappy' >/dev/null 2>&1; then
    python3 -m pip install kafka-python==3.0.12 pytest==9.2.0 lz4==4.4.5 zstandard==0.25.0 \
        python-snappy==0.7.3 cramjam==2.14.0
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --workspace --bins

rust_status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast || rust_status=$?
else
    cargo test --workspace --no-fail-fast || rust_status=$?
fi

python_status=0
SLUICE_BIN="$CARGO_TARGET_DIR/debug/sluice" python3 -m pytest tests/python -q || python_status=$?

if [ "$rust_status" -ne 0 ] || [ "$python_status" -ne 0 ]; then
    echo "tests failed: rust exit $rust_status, python exit $python_status" >&2
    exit 1
fi
echo "all tests passed"
