#!/usr/bin/env bash
# perf/summary.sh — the durable-path figures of one build in interleaved rounds, with the
# machine's limits measured in the same rounds: fio write and read, fio O_DSYNC writes in S1
# acks=all's shape (8 writers, one 192 KiB durable write each in flight: what the disk gives
# a commit path with one durable flush per partition), fio 16 KiB writes over 1,000
# pre-allocated files (S5's writes), iperf3 over loopback, S1
# (acks=1 and acks=all), S1's shape with S5's batches (8 partitions, 16 producers, 16 KiB
# batches: what S5 would reach without its 1,000 partitions), S2 (100 B lz4 records), S3 at
# 50/100/200 MB/s, S5 (1,000 partitions), hot consume (8 consumers right after the writes) and
# S4 (the same backlog read cold, after a restart). Prints every run and the medians, and the
# ratios the targets are stated in.
#
#   perf/summary.sh [--rounds N] [--duration D] [--backlog-records N] [--out DIR]
#
# One round runs every measurement once, each on a fresh broker and data directory, so every
# scenario meets the same mix of disturbances on a shared machine. The broker runs pinned to
# CPU 0 (`--cores 1`), the load generator to CPU 1 (BROKER_CPU / BENCH_CPU override).
# SLUICE_BIN / BENCH_BIN pick the binaries (default: <target dir>/release/{sluice,sluice-bench});
# DATA_DIR the disk measured (default: a directory under --out). Needs fio (installed with
# apt-get when missing) and iperf3 (likewise).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=$( (cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null) |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null ||
    echo "${CARGO_TARGET_DIR:-$ROOT/target}")
SLUICE_BIN=${SLUICE_BIN:-$TARGET/release/sluice}
BENCH_BIN=${BENCH_BIN:-$TARGET/release/sluice-bench}
BROKER_CPU=${BROKER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}

die() { echo "perf/summary.sh: $*" >&2; exit 1; }

ROUNDS=3
DURATION=10s
# 2 GiB of 1 KiB records: long enough for a cold read to reach a steady rate, short enough for
# three rounds in a quiet quarter of an hour (the S4 scenario file uses 4 GiB).
BACKLOG=2097152
OUT=$ROOT/perf/out/summary-$(date -u +%Y%m%d-%H%M%S)
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --backlog-records) BACKLOG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) die "unknown option $1" ;;
    esac
done
[[ -x $SLUICE_BIN ]] || die "$SLUICE_BIN missing: cargo build --release -p sluice -p sluice-bench"
[[ -x $BENCH_BIN ]] || die "$BENCH_BIN missing: cargo build --release -p sluice -p sluice-bench"
for tool in fio iperf3; do
    command -v $tool >/dev/null || { (apt-get update -qq && apt-get install -y -qq $tool) >/dev/null || die "cannot install $tool"; }
done
DATA_DIR=${DATA_DIR:-$OUT/data}
mkdir -p "$OUT" "$DATA_DIR"
RESULTS=$OUT/results.tsv
: >"$RESULTS"
echo "results in $OUT"

PID=
PORT=
D=
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DATA_DIR"/run-*; }
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts a broker on data directory $D (fresh unless $1 = keep) and waits until it listens.
start_broker() {
    if [[ ${1:-} != keep ]]; then
        D=$(mktemp -d "$DATA_DIR/run-XXXXXX")
        PORT=$(free_port)
    fi
    taskset -c "$BROKER_CPU" "$SLUICE_BIN" start --cores 1 --data-dir "$D" \
        --listen "127.0.0.1:$PORT" >>"$D.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 400); do
        kill -0 "$PID" 2>/dev/null || die "broker exited, log in $D.log"
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.05
    done
    die "broker not listening after 20 s, log in $D.log"
}

stop_broker() {
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
}

drop_data() { rm -rf "$D" "$D.log"; }

bench() {
    taskset -c "$BENCH_CPU" "$BENCH_BIN" "$@" --brokers "127.0.0.1:$PORT" --cpu-list "$BENCH_CPU" --quiet >/dev/null 2>&1
}

# record NAME ROUND VALUE...: one line of results.
record() { printf '%s\t%s\t%s\n' "$1" "$2" "${*:3}" >>"$RESULTS"; }

json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(' '.join(str(round(j.get(k,float('nan')),2)) for k in sys.argv[2:]))" "$@"; }

fio_run() {
    local rw=$1
    fio --name=limit --directory="$DATA_DIR" --size=2G --direct=1 --ioengine=io_uring --bs=1M \
        --iodepth=8 --rw="$rw" --output-format=json --output="$OUT/fio-$rw.json" >/dev/null
    python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; k='write' if sys.argv[2]=='write' else 'read'; print(round(j[k]['bw_bytes']/1e6,1))" "$OUT/fio-$rw.json" "$rw"
}

# O_DSYNC direct writes, 8 jobs at queue depth 1 of 192 KiB: S1 acks=all's durable writes (one
# flush of about three 64 KiB batches per partition in flight, 8 partitions). On a disk without
# FUA each is a write and a cache flush; this is what the disk gives that shape (MB/s).
fio_dsync_run() {
    fio --name=dsync --directory="$DATA_DIR" --size=256M --numjobs=8 --group_reporting \
        --direct=1 --ioengine=io_uring --bs=192k --iodepth=1 --sync=dsync --rw=write \
        --output-format=json --output="$OUT/fio-dsync.json" >/dev/null
    python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw_bytes']/1e6,1))" "$OUT/fio-dsync.json"
}

# S5's writes: 16 KiB direct writes, 40 in flight, spread over 1,000 files pre-allocated as a
# segment is (unwritten extents, converted as they are written): what the disk gives a log of
# 1,000 partitions whose appends each go to their own file (MB/s).
fio_many_run() {
    fio --name=many --directory="$DATA_DIR" --nrfiles=1000 --size=8G --bs=16k --iodepth=40 \
        --direct=1 --ioengine=io_uring --fallocate=native --rw=write --runtime=8 --time_based \
        --output-format=json --output="$OUT/fio-many.json" >/dev/null
    python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw_bytes']/1e6,1))" "$OUT/fio-many.json"
}

# One TCP stream over loopback, server and client pinned like the broker and the load
# generator: the most one connection can move on this machine (MB/s).
iperf_run() {
    local port
    port=$(free_port)
    taskset -c "$BROKER_CPU" iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
    local server=$!
    # Wait for the listening socket without connecting: `iperf3 -s -1` serves one connection.
    for _ in $(seq 1 100); do
        [[ -n $(ss -Hltn "sport = :$port") ]] && break
        sleep 0.05
    done
    taskset -c "$BENCH_CPU" iperf3 -c 127.0.0.1 -p "$port" -t 5 -J >"$OUT/iperf3.json" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['end']['sum_received']['bits_per_second']/8e6,1))" "$OUT/iperf3.json" 2>/dev/null || echo nan
}

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r of $ROUNDS"
    record fio-write "$r" "$(fio_run write)"
    record fio-read "$r" "$(fio_run read)"
    rm -f "$DATA_DIR"/limit.*
    record fio-dsync "$r" "$(fio_dsync_run)"
    rm -f "$DATA_DIR"/dsync.*
    record fio-many "$r" "$(fio_many_run)"
    rm -f "$DATA_DIR"/many.*
    record iperf3 "$r" "$(iperf_run)"

    for acks in 1 all; do
        start_broker
        bench produce --topic s1 --partitions 8 --producers 8 --size 1KiB --payload random \
            --batch-bytes 64KiB --acks "$acks" --compression none --warmup 2s --duration "$DURATION" \
            --json "$OUT/s1-$acks-$r.json"
        record "s1-acks-$acks" "$r" "$(json "$OUT/s1-$acks-$r.json" publishThroughputMBps publishLatency99pct)"
        stop_broker; drop_data
    done

    # S5's request shape on S1's 8 partitions: the control that separates the cost of 1,000
    # partitions from the cost of 4x as many (16 KiB) requests per byte.
    start_broker
    bench produce --topic s1 --partitions 8 --producers 16 --size 1KiB --payload random \
        --batch-bytes 16KiB --acks 1 --warmup 2s --duration "$DURATION" --json "$OUT/s1-16k-$r.json"
    record s1-16k "$r" "$(json "$OUT/s1-16k-$r.json" publishThroughputMBps)"
    stop_broker; drop_data

    start_broker
    bench produce --topic s2 --partitions 8 --producers 8 --size 100 --payload text \
        --batch-bytes 64KiB --acks 1 --compression lz4 --warmup 2s --duration "$DURATION" \
        --json "$OUT/s2-$r.json"
    record s2 "$r" "$(json "$OUT/s2-$r.json" publishRate)"
    stop_broker; drop_data

    for rate in 50 100 200; do
        start_broker
        bench e2e --topic s3 --partitions 8 --producers 8 --size 1KiB --payload random \
            --rate "${rate}MB/s" --linger-ms 1 --acks all --group s3 --consumers 1 --from latest \
            --fetch-max-wait-ms 500 --warmup 2s --duration "$DURATION" --json "$OUT/s3-$rate-$r.json"
        record "s3-$rate" "$r" "$(json "$OUT/s3-$rate-$r.json" publishThroughputMBps endToEndLatency50pct endToEndLatency99pct endToEndLatency9999pct)"
        stop_broker; drop_data
    done

    start_broker
    bench produce --topic s5 --partitions 1000 --producers 16 --size 1KiB --payload random \
        --batch-bytes 16KiB --acks 1 --warmup 2s --duration "$DURATION" --json "$OUT/s5-$r.json"
    record s5 "$r" "$(json "$OUT/s5-$r.json" publishThroughputMBps)"
    stop_broker; drop_data

    start_broker
    bench produce --topic s4 --partitions 8 --producers 8 --size 1KiB --payload random \
        --batch-bytes 64KiB --acks 1 --count "$BACKLOG" --json "$OUT/s4-write-$r.json"
    bench consume --topic s4 --consumers 8 --from earliest --partition-max-bytes 8MiB \
        --count "$BACKLOG" --duration 300s --json "$OUT/hot-$r.json"
    record hot-consume "$r" "$(json "$OUT/hot-$r.json" consumeThroughputMBps)"
    stop_broker
    start_broker keep
    bench consume --topic s4 --consumers 1 --from earliest --fetch-max-bytes 50MB \
        --partition-max-bytes 8MiB --count "$BACKLOG" --duration 300s --json "$OUT/s4-$r.json"
    record s4-cold "$r" "$(json "$OUT/s4-$r.json" consumeThroughputMBps)"
    stop_broker; drop_data
done

python3 - "$RESULTS" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, rnd, vals = line.rstrip("\n").split("\t")
    vals = [float(v) for v in vals.split()]
    if vals:
        rows.setdefault(name, []).append(vals)
def med(name, i=0):
    return statistics.median(r[i] for r in rows[name]) if name in rows else float("nan")
def runs(name, i=0):
    return ", ".join(f"{r[i]:g}" for r in rows.get(name, []))
print("\n| measurement | runs | median |")
print("| --- | --- | --- |")
for name, label, i in [("fio-write", "fio write MB/s", 0), ("fio-read", "fio read MB/s", 0),
                       ("fio-dsync", "fio O_DSYNC write, 8 x 192 KiB at QD 1 MB/s", 0),
                       ("fio-many", "fio 16 KiB writes at QD 40 over 1,000 pre-allocated files MB/s", 0),
                       ("iperf3", "iperf3 loopback, one stream MB/s", 0),
                       ("s1-acks-1", "S1 acks=1 MB/s", 0), ("s1-acks-all", "S1 acks=all MB/s", 0),
                       ("s1-acks-all", "S1 acks=all ack p99 ms", 1),
                       ("s1-16k", "S1 shape, 16 producers x 16 KiB batches MB/s", 0),
                       ("s2", "S2 100 B lz4 records/s", 0),
                       ("s3-50", "S3 50 MB/s: produced MB/s", 0), ("s3-50", "S3 50: e2e p99 ms", 2),
                       ("s3-100", "S3 100 MB/s: produced MB/s", 0), ("s3-100", "S3 100: e2e p99 ms", 2),
                       ("s3-200", "S3 200 MB/s: produced MB/s", 0), ("s3-200", "S3 200: e2e p50 ms", 1),
                       ("s3-200", "S3 200: e2e p99 ms", 2), ("s3-200", "S3 200: e2e p99.99 ms", 3),
                       ("s5", "S5 1,000 partitions acks=1 MB/s", 0),
                       ("hot-consume", "hot consume, 8 consumers MB/s", 0),
                       ("s4-cold", "S4 cold catch-up MB/s", 0)]:
    print(f"| {label} | {runs(name, i)} | {med(name, i):g} |")
fw, fr = med("fio-write"), med("fio-read")
print("\n| target | reached |")
print("| --- | --- |")
print(f"| S1 acks=all >= 70 % of fio write | {100*med('s1-acks-all')/fw:.1f} % ({100*med('s1-acks-all')/med('fio-dsync'):.1f} % of fio's O_DSYNC writes of its shape) |")
print(f"| S1 acks=1 >= 85 % of fio write | {100*med('s1-acks-1')/fw:.1f} % |")
print(f"| S5 >= 60 % of S1 acks=1 | {100*med('s5')/med('s1-acks-1'):.1f} % (of the same batches on 8 partitions: {100*med('s5')/med('s1-16k'):.1f} %; of fio's writes of its shape: {100*med('s5')/med('fio-many'):.1f} %) |")
print(f"| S2 >= 7 M records/s | {med('s2')/1e6:.2f} M records/s |")
print(f"| S4 cold >= 80 % of fio read | {100*med('s4-cold')/fr:.1f} % |")
print(f"| hot consume >= 1,200 MB/s | {med('hot-consume'):g} MB/s |")
print(f"| S3 200 MB/s: e2e p99 <= 3 ms, p99.99 <= 10 ms | {med('s3-200', 2):g} / {med('s3-200', 3):g} ms at {med('s3-200'):g} MB/s |")
PY
