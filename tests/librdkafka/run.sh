#!/usr/bin/env bash
# librdkafka's own integration tests against a real Sluice broker.
#
#   tests/librdkafka/run.sh            the quick list (tests/librdkafka/quick.txt), as .ci/run does
#   tests/librdkafka/run.sh --all      every test in tests/librdkafka/allowlist.txt
#   tests/librdkafka/run.sh 0012 0030  these tests (to try one outside the lists)
#
# The suite is librdkafka's `tests/` directory from the source the rdkafka-sys crate ships (the
# same librdkafka version the Rust tests link). It is copied into $CARGO_TARGET_DIR and built
# there once (`./configure`, `make libs`, `make -C tests build`: a few minutes). Each test runs
# on its own with `test-runner -E` (no sockem: that intercepts sockets in-process) in full mode
# (not -Q, which skips most sub-tests), against one broker started like Kafka's test cluster:
# topic auto-creation on, 4 partitions per auto-created topic. A test passes when test-runner
# exits 0. Broker stderr and every test's output are kept in $OUT.
#
# Environment: SLUICE_BIN (default: the debug build), TEST_KAFKA_VERSION (default 3.9.0: the
# version whose features the suite expects; tests needing newer ones skip themselves).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
HERE="$REPO/tests/librdkafka"
SUITE="$CARGO_TARGET_DIR/librdkafka-suite"
OUT="$CARGO_TARGET_DIR/librdkafka-suite-out"
SLUICE_BIN="${SLUICE_BIN:-$CARGO_TARGET_DIR/debug/sluice}"
# One test may take this long before it counts as failed (test-runner has its own timeouts;
# this bounds a hang).
TEST_TIMEOUT_S=300

die() { echo "librdkafka suite: $*" >&2; exit 1; }

list() { grep -v '^#' "$1" | awk '{print $1}' | grep -E '^[0-9]{4}$'; }
case "${1:-}" in
    --all) mapfile -t TESTS < <(list "$HERE/allowlist.txt") ;;
    "") mapfile -t TESTS < <(list "$HERE/quick.txt") ;;
    *) TESTS=("$@") ;;
esac
[ "${#TESTS[@]}" -gt 0 ] || die "no tests selected"
[ -x "$SLUICE_BIN" ] || die "$SLUICE_BIN missing: cargo build --bin sluice"
SLUICE_BIN="$(realpath "$SLUICE_BIN")"

# --- the suite, built once ------------------------------------------------------------------
src="$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "rdkafka-sys":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "librdkafka"))
        break
')"
[ -d "$src/tests" ] || die "librdkafka source not found (rdkafka-sys crate): $src"
version="$(basename "$(dirname "$src")")"
if [ ! -x "$SUITE/tests/test-runner" ] || [ "$(cat "$SUITE/.version" 2>/dev/null)" != "$version" ]; then
    echo "librdkafka suite: building $version into $SUITE"
    rm -rf "$SUITE" && mkdir -p "$SUITE" && cp -a "$src/." "$SUITE/" || die "cannot copy $src"
    (cd "$SUITE" && ./configure --disable-gssapi --disable-curl >"$SUITE/configure.log" 2>&1) \
        || die "configure failed: $SUITE/configure.log"
    (cd "$SUITE" && make -j"$(nproc)" libs >"$SUITE/make.log" 2>&1) || die "make libs failed: $SUITE/make.log"
    (cd "$SUITE/tests" && make -j"$(nproc)" build >"$SUITE/make-tests.log" 2>&1) \
        || die "building the tests failed: $SUITE/make-tests.log"
    echo "$version" >"$SUITE/.version"
fi

# --- the broker -----------------------------------------------------------------------------
rm -rf "$OUT" && mkdir -p "$OUT"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$SLUICE_BIN" start --data-dir "$OUT/data" --listen "127.0.0.1:$port" --cores 2 \
    --default-partitions 4 --segment-bytes 8388608 2>"$OUT/broker.log" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null' EXIT
for _ in $(seq 1 600); do
    kill -0 "$broker" 2>/dev/null || die "broker exited at start: $(tail -3 "$OUT/broker.log")"
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.05
done
# Tests that shell out to Kafka's kafka-topics.sh get a stand-in over the sluice CLI.
export KAFKA_PATH="$HERE/kafka" BROKERS="127.0.0.1:$port" SLUICE_BIN
cat >"$SUITE/tests/test.conf" <<CONF
metadata.broker.list=127.0.0.1:$port
test.topic.random=true
CONF

# --- the tests ------------------------------------------------------------------------------
# -L: only tests that need a broker; -E: no sockem tests. A listed test that skips itself (a
# broker version or a build feature it needs) counts as failed: it was expected to run.
export LD_LIBRARY_PATH="$SUITE/src:$SUITE/src-cpp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
passed=() failed=()
for t in "${TESTS[@]}"; do
    start=$(date +%s)
    (cd "$SUITE/tests" && TESTS="$t" TEST_KAFKA_VERSION="${TEST_KAFKA_VERSION:-3.9.0}" \
        timeout "$TEST_TIMEOUT_S" ./test-runner -L -E -S >"$OUT/$t.log" 2>&1)
    rc=$?
    # A file may hold a broker test and a local one (skipped under -L): it ran if one passed.
    if [ $rc -eq 0 ] && ! grep -aqE "Test ${t}_[A-Za-z0-9_]+ PASSED" "$OUT/$t.log"; then
        failed+=("$t"); echo "librdkafka $t: SKIPPED ($(grep -m1 -o 'SKIPPING TEST.*' "$OUT/$t.log" | cut -c1-160))"
        continue
    fi
    secs=$(( $(date +%s) - start ))
    if ! kill -0 "$broker" 2>/dev/null; then
        failed+=("$t")
        echo "librdkafka $t: FAILED — the broker exited (log: $OUT/broker.log)"
        break
    fi
    if [ $rc -eq 0 ]; then
        passed+=("$t"); echo "librdkafka $t: passed (${secs}s)"
    else
        failed+=("$t"); echo "librdkafka $t: FAILED (exit $rc, ${secs}s; $OUT/$t.log): $(grep -m1 -E 'FAIL|Test assert' "$OUT/$t.log" | cut -c1-200)"
    fi
done
echo "librdkafka suite: ${#passed[@]} passed, ${#failed[@]} failed${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
