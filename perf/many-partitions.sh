#!/usr/bin/env bash
# Many partitions on one shard: topic creation, a short produce load, a clean shutdown (SIGTERM
# to exit) and a restart (to listening). Prints one line of timings.
#
#   perf/many-partitions.sh [PARTITIONS] [PORT]
#
# CRASH=1 kills the broker with SIGKILL instead (no clean shutdown: the restart recovers every
# log by scanning its active segment) and, run as root, drops the page cache before the
# restart so the scans read from the disk.
#
# SLUICE (default target/release/sluice) and SLUICE_BENCH (default target/release/sluice-bench)
# pick the binaries. The broker runs with --cores 1 on CPU 0, the load generator on CPU 1.
# The data goes to a temporary directory, removed at the end.
set -euo pipefail
N="${1:-3000}"
PORT="${2:-19611}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SLUICE="${SLUICE:-$REPO/target/release/sluice}"
BENCH="${SLUICE_BENCH:-$REPO/target/release/sluice-bench}"
D="$(mktemp -d)"
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$D"' EXIT

listening() {
    for _ in $(seq 1200); do
        (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        kill -0 "$PID" 2>/dev/null || { echo "broker exited; log in $D/broker.log" >&2; return 1; }
        sleep 0.05
    done
    echo "broker not listening after 60 s" >&2
    return 1
}
now() { date +%s.%N; }

taskset -c 0 "$SLUICE" start --data-dir "$D/data" --listen "127.0.0.1:$PORT" --cores 1 >"$D/broker.log" 2>&1 &
PID=$!
listening
t0=$(now)
"$SLUICE" topic create many -p "$N" --brokers "127.0.0.1:$PORT" >/dev/null
t1=$(now)
taskset -c 1 "$BENCH" produce --brokers "127.0.0.1:$PORT" --topic many --duration 10s --acks 1 >/dev/null 2>&1
t2=$(now)
if [ "${CRASH:-0}" = 1 ]; then
    kill -KILL "$PID"
    wait "$PID" || true
    if [ "$(id -u)" = 0 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
else
    kill -TERM "$PID"
    wait "$PID" || true
fi
t3=$(now)
taskset -c 0 "$SLUICE" start --data-dir "$D/data" --listen "127.0.0.1:$PORT" --cores 1 >>"$D/broker.log" 2>&1 &
PID=$!
listening
t4=$(now)
kill -TERM "$PID"
wait "$PID" || true
PID=
emfile=$(grep -c "Too many open files" "$D/broker.log" || true)
python3 -c "print(f'partitions $N: create {$t1-$t0:.1f} s, {\"kill -9\" if \"${CRASH:-0}\" == \"1\" else \"shutdown\"} {$t3-$t2:.2f} s, restart to listening {$t4-$t3:.2f} s, EMFILE lines $emfile')"
