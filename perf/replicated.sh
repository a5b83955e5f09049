#!/usr/bin/env bash
# Replicated against single-node throughput and latency on one machine: S1 (acks=all, 64 KiB
# batches) and S3 (acks=all end to end at a fixed rate) against one broker with a topic of one
# replica, then against a three-node cluster (127.0.0.1-3) with a topic of three replicas, in
# interleaved rounds. Prints one line per run and the medians.
#
#   perf/replicated.sh [ROUNDS] [S3_RATE]        # defaults: 3 rounds, 50MB/s
#
# SLUICE / SLUICE_BENCH pick the binaries (default target/release/...); SCENARIOS (default
# "s1 s3") which scenarios run. Every broker runs with
# --cores 1 on CPU 0 (so a cluster's three brokers share that core), the load generator on CPU 1.
# Each run starts fresh brokers in a temporary directory, removed at the end.
set -euo pipefail
ROUNDS="${1:-3}"
RATE="${2:-50MB/s}"
DURATION="${DURATION:-10s}"
SCENARIOS="${SCENARIOS:-s1 s3}" # e.g. SCENARIOS=s1 for the throughput comparison alone
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SLUICE="${SLUICE:-$REPO/target/release/sluice}"
BENCH="${SLUICE_BENCH:-$REPO/target/release/sluice-bench}"
# D, PIDS (stopped and removed at exit), wait_for, live_nodes.
source "$REPO/perf/cluster-lib.sh"

KAFKA_PORT=19731
INTERNAL_PORT=19741 # and +1: shard 0's partition transport

wait_listening() { # host port pid
    for _ in $(seq 600); do
        (echo >"/dev/tcp/$1/$2") 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "broker on $1:$2 exited" >&2; return 1; }
        sleep 0.05
    done
    echo "broker on $1:$2 not listening after 30 s" >&2
    return 1
}

stop_all() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    rm -rf "$D/data"*
}

start_single() {
    taskset -c 0 "$SLUICE" start --cores 1 --data-dir "$D/data" --listen "127.0.0.1:$KAFKA_PORT" \
        >"$D/broker.log" 2>&1 &
    PIDS+=($!)
    wait_listening 127.0.0.1 "$KAFKA_PORT" "$!"
    BOOT="127.0.0.1:$KAFKA_PORT"
    RF=1
}

start_cluster() {
    local ctl="1@127.0.0.1:$INTERNAL_PORT,2@127.0.0.2:$INTERNAL_PORT,3@127.0.0.3:$INTERNAL_PORT"
    for n in 1 2 3; do
        taskset -c 0 "$SLUICE" start --cores 1 --data-dir "$D/data$n" --node-id "$n" \
            --controllers "$ctl" --listen "127.0.0.$n:$KAFKA_PORT" >"$D/broker$n.log" 2>&1 &
        PIDS+=($!)
    done
    for n in 1 2 3; do wait_listening "127.0.0.$n" "$KAFKA_PORT" "${PIDS[$((n - 1))]}"; done
    BOOT="127.0.0.1:$KAFKA_PORT,127.0.0.2:$KAFKA_PORT,127.0.0.3:$KAFKA_PORT"
    RF=3
    # Every node registered before the topic is placed over them.
    for _ in $(seq 200); do
        [ "$("$SLUICE" cluster status --brokers "$BOOT" 2>/dev/null | grep -c ' live')" -ge 3 ] && break
        sleep 0.1
    done
}

create_topic() { # name
    "$SLUICE" topic create "$1" -p 8 -r "$RF" --brokers "$BOOT" >/dev/null
}

s1() { # label
    create_topic s1
    taskset -c 1 "$BENCH" produce --brokers "$BOOT" --cpu-list 1 --topic s1 --partitions 8 \
        --replication-factor "$RF" --producers 8 --size 1KiB --payload random --batch-bytes 64KiB \
        --acks all --compression none --warmup 2s --duration "$DURATION" --json "$D/s1.json" \
        >"$D/s1.out" 2>&1 || { echo "$1 s1 failed:"; tail -3 "$D/s1.out"; return 0; }
    python3 - "$1" "$D/s1.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]} s1 MB/s {j['publishThroughputMBps']:.1f} ack_p99_ms {j['publishLatency99pct']:.1f}")
EOF
}

s3() { # label
    create_topic s3
    taskset -c 1 "$BENCH" e2e --brokers "$BOOT" --cpu-list 1 --topic s3 --partitions 8 \
        --replication-factor "$RF" --producers 8 --size 1KiB --payload random --rate "$RATE" \
        --linger-ms 1 --acks all --group s3 --consumers 1 --from latest --fetch-max-wait-ms 500 \
        --warmup 2s --duration "$DURATION" --json "$D/s3.json" >"$D/s3.out" 2>&1 ||
        { echo "$1 s3 failed:"; tail -3 "$D/s3.out"; return 0; }
    python3 - "$1" "$D/s3.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[2]))
g = lambda k: j.get(k, float("nan"))
print(f"{sys.argv[1]} s3 MB/s {g('publishThroughputMBps'):.1f} e2e_p50_ms {g('endToEndLatency50pct'):.2f}"
      f" e2e_p99_ms {g('endToEndLatency99pct'):.2f} e2e_p9999_ms {g('endToEndLatency9999pct'):.2f}")
EOF
}

for _ in $(seq "$ROUNDS"); do
    for sc in $SCENARIOS; do
        start_single; "$sc" single; stop_all
        start_cluster; "$sc" rf3; stop_all
    done
done | tee "$D/runs.txt"

# Medians per setup and scenario, and the replicated / single-node throughput ratio.
python3 - "$D/runs.txt" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) < 4 or f[1] not in ("s1", "s3") or f[2] != "MB/s":
        continue
    vals = dict(zip(f[2::2], (float(x) for x in f[3::2])))
    rows.setdefault((f[0], f[1]), []).append(vals)
print("medians:")
for (label, sc), runs in sorted(rows.items()):
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"  {label} {sc} ({len(runs)} runs): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
for sc in ("s1", "s3"):
    a, b = rows.get(("rf3", sc)), rows.get(("single", sc))
    if a and b:
        ra = statistics.median(r["MB/s"] for r in a)
        rb = statistics.median(r["MB/s"] for r in b)
        print(f"  {sc}: rf3 / single throughput = {ra / rb:.2f}")
EOF
