#!/usr/bin/env bash
# librdkafka's own integration tests against a real Sluice broker.
#
#   tests/librdkafka/run.sh            the quick list (tests/librdkafka/quick.txt), as .ci/run does
#   tests/librdkafka/run.sh --all      every test in tests/librdkafka/allowlist.txt
#   tests/librdkafka/run.sh 0012 0107:noautocreate   these tests (to try one outside the lists)
#   tests/librdkafka/run.sh --consumer [--all | NNNN...]   the group tests under the KIP-848
#       consumer protocol (TEST_CONSUMER_GROUP_PROTOCOL=consumer): consumer-quick.txt, or with
#       --all consumer.txt, or the tests named
#
# The suite is librdkafka's `tests/` directory from the source the rdkafka-sys crate ships (the
# same librdkafka version the Rust tests link). It is copied into $CARGO_TARGET_DIR and built
# there once (`./configure`, `make libs`, `make -C tests build`: a few minutes). Each test runs
# on its own with `test-runner -E` (no sockem: that intercepts sockets in-process) in full mode
# (not -Q, which skips most sub-tests), against a broker started like librdkafka's test cluster
# for the test's scenario (below). A test passes when test-runner
# exits 0. Broker stderr and every test's output are kept in $OUT.
#
# Environment: SLUICE_BIN (default: the debug build), TEST_KAFKA_VERSION (default 3.9.0: the
# version whose features the suite expects; tests needing newer ones skip themselves; 4.0.0
# under --consumer, which librdkafka needs for the consumer protocol),
# TEST_CONSUMER_GROUP_PROTOCOL (classic or consumer; --consumer sets it), LIBRDKAFKA_TEST_TIMEOUT_S.
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
TEST_TIMEOUT_S="${LIBRDKAFKA_TEST_TIMEOUT_S:-300}"

die() { echo "librdkafka suite: $*" >&2; exit 1; }

# Entries are "NNNN SCENARIO": a list line is "NNNN name [scenario]", scenario "default" if
# none; on the command line "NNNN" or "NNNN:scenario".
list() { grep -v '^#' "$1" | awk '$1 ~ /^[0-9][0-9][0-9][0-9]$/ {print $1, ($3 == "" ? "default" : $3)}'; }
QUICK="$HERE/quick.txt" ALL="$HERE/allowlist.txt"
if [ "${1:-}" = --consumer ]; then
    shift
    export TEST_CONSUMER_GROUP_PROTOCOL=consumer
    export TEST_KAFKA_VERSION="${TEST_KAFKA_VERSION:-4.0.0}"
    QUICK="$HERE/consumer-quick.txt" ALL="$HERE/consumer.txt"
fi
case "${1:-}" in
    --all) mapfile -t TESTS < <(list "$ALL") ;;
    "") mapfile -t TESTS < <(list "$QUICK") ;;
    *) TESTS=(); for a in "$@"; do t=${a%%:*}; s=${a#*:}; [ "$s" = "$a" ] && s=default; TESTS+=("$t $s"); done ;;
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
# 0103_transactions creates its topics with replication factor 3, as librdkafka's three-broker
# test cluster allows; one broker accepts factor 1 only (as Kafka's does), so the copy is built
# with 1. Part of the stamp below, so that an earlier unpatched build is rebuilt.
SUITE_PATCH="0103-rf1"
version="$(basename "$(dirname "$src")")+$SUITE_PATCH"
if [ ! -x "$SUITE/tests/test-runner" ] || [ "$(cat "$SUITE/.version" 2>/dev/null)" != "$version" ]; then
    echo "librdkafka suite: building $version into $SUITE"
    # Build logs go beside the source: mklove's configure takes any ./configure.* file in the
    # source dir for one of its modules.
    logs="$SUITE-build-logs"
    rm -rf "$SUITE" "$logs" && mkdir -p "$SUITE" "$logs" && cp -a "$src/." "$SUITE/" || die "cannot copy $src"
    chmod -R u+w "$SUITE"
    sed -i 's/, 3, 5000);/, 1, 5000);/' "$SUITE/tests/0103-transactions.c"
    grep -q ', 3, 5000);' "$SUITE/tests/0103-transactions.c" && die "cannot patch 0103-transactions.c"
    (cd "$SUITE" && ./configure --disable-gssapi --disable-curl >"$logs/configure.txt" 2>&1) \
        || die "configure failed: $logs/configure.txt"
    (cd "$SUITE" && make -j"$(nproc)" libs >"$logs/make.txt" 2>&1) || die "make libs failed: $logs/make.txt"
    (cd "$SUITE/tests" && make -j"$(nproc)" build >"$logs/make-tests.txt" 2>&1) \
        || die "building the tests failed: $logs/make-tests.txt"
    echo "$version" >"$SUITE/.version"
fi

# --- brokers, one per scenario -------------------------------------------------------------
# librdkafka's scenarios are cluster set-ups: "default" is Kafka's test cluster (topics
# auto-created, 4 partitions); "noautocreate" has topic auto-creation off. A test runs with
# `-s <scenario>` against a broker started that way.
# Each group protocol keeps its own logs, so a failure of the first run can still be read
# after the second.
OUT="$OUT${TEST_CONSUMER_GROUP_PROTOCOL:+-$TEST_CONSUMER_GROUP_PROTOCOL}"
rm -rf "$OUT" && mkdir -p "$OUT"
broker=""
trap '[ -n "$broker" ] && kill "$broker" 2>/dev/null; wait 2>/dev/null' EXIT
start_broker() { # scenario
    if [ -n "$broker" ]; then kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; fi
    local extra=() log="$OUT/broker-$1.log"
    [ "$1" = noautocreate ] && extra=(--auto-create-topics false)
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    "$SLUICE_BIN" start --data-dir "$OUT/data-$1" --listen "127.0.0.1:$port" --cores 2 \
        --default-partitions 4 --segment-bytes 8388608 "${extra[@]}" 2>"$log" &
    broker=$!
    BROKER_LOG=$log
    for _ in $(seq 1 600); do
        kill -0 "$broker" 2>/dev/null || die "broker exited at start: $(tail -3 "$log")"
        (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
        sleep 0.05
    done
    # Tests that shell out to Kafka's kafka-topics.sh get a stand-in over the sluice CLI.
    export KAFKA_PATH="$HERE/kafka" BROKERS="127.0.0.1:$port" SLUICE_BIN
    printf 'metadata.broker.list=127.0.0.1:%s\ntest.topic.random=true\n' "$port" >"$SUITE/tests/test.conf"
}

# --- the tests ------------------------------------------------------------------------------
# -L: only tests that need a broker; -E: no sockem tests. A listed test that skips itself (a
# broker version or a build feature it needs, another scenario) counts as failed: it was
# expected to run.
export LD_LIBRARY_PATH="$SUITE/src:$SUITE/src-cpp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
passed=() failed=()
for scenario in default noautocreate; do
    mine=()
    for entry in "${TESTS[@]}"; do
        [ "${entry#* }" = "$scenario" ] && mine+=("${entry%% *}")
    done
    [ "${#mine[@]}" -gt 0 ] || continue
    start_broker "$scenario"
    for t in "${mine[@]}"; do
        start=$(date +%s)
        (cd "$SUITE/tests" && TESTS="$t" TEST_KAFKA_VERSION="${TEST_KAFKA_VERSION:-3.9.0}" \
            timeout "$TEST_TIMEOUT_S" ./test-runner -L -E -S -s "$scenario" >"$OUT/$t.log" 2>&1)
        rc=$?
        secs=$(( $(date +%s) - start ))
        if ! kill -0 "$broker" 2>/dev/null; then
            failed+=("$t")
            echo "librdkafka $t: FAILED — the broker exited (log: $BROKER_LOG)"
            break 2
        fi
        # A file may hold a broker test and a local one (skipped under -L): it ran if one passed.
        if [ $rc -eq 0 ] && ! grep -aqE "Test ${t}_[A-Za-z0-9_]+ PASSED" "$OUT/$t.log"; then
            failed+=("$t"); echo "librdkafka $t: SKIPPED ($(grep -a -m1 -o 'SKIPPING TEST.*' "$OUT/$t.log" | cut -c1-160))"
        elif [ $rc -eq 0 ]; then
            passed+=("$t"); echo "librdkafka $t: passed (${secs}s)"
        else
            failed+=("$t"); echo "librdkafka $t: FAILED (exit $rc, ${secs}s; $OUT/$t.log): $(grep -a -m1 -E 'Test assert|failed at' "$OUT/$t.log" | cut -c1-200)"
            # Enough of both logs to diagnose from the CI output alone.
            echo "--- $t: last lines of its log ---"
            tail -n 40 "$OUT/$t.log" | cut -c1-300 | sed 's/^/    /'
            echo "--- the broker's last lines ---"
            tail -n 15 "$BROKER_LOG" | cut -c1-300 | sed 's/^/    /'
        fi
    done
done
echo "librdkafka suite${TEST_CONSUMER_GROUP_PROTOCOL:+ (group.protocol=$TEST_CONSUMER_GROUP_PROTOCOL)}: ${#passed[@]} passed, ${#failed[@]} failed${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
