#!/usr/bin/env bash
# Idle cost of replicated partitions: a three-node cluster (127.0.0.1-3, `--cores 1` each) with
# N partitions at RF 3 (topics idle-0, idle-1, ... of up to 100 each) and no clients. Once every partition has a leader and three
# in-sync replicas, and after SETTLE seconds, samples each broker's CPU time (utime + stime from
# /proc/<pid>/stat) and its partition transport counters (/metrics, sluice_raft_*) over WINDOW
# seconds. Prints per node: CPU %, raft messages, frames and bytes sent per second.
#
#   perf/raft_idle.sh [N...]          # default: 1 200 1000
#
# SLUICE picks the binary (default target/release/sluice); EXTRA_ARGS are added to every
# `sluice start`. Fresh data directories per run, removed at the end.
set -euo pipefail
COUNTS=("${@:-1 200 1000}")
# shellcheck disable=SC2206
COUNTS=(${COUNTS[*]})
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SLUICE="${SLUICE:-$REPO/target/release/sluice}"
SETTLE="${SETTLE:-5}"
WINDOW="${WINDOW:-20}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
# D, PIDS (stopped and removed at exit), wait_for, live_nodes.
source "$REPO/perf/cluster-lib.sh"

KAFKA_PORT=19761
INTERNAL_PORT=19771
METRICS_PORT=19781
BOOT="127.0.0.1:$KAFKA_PORT,127.0.0.2:$KAFKA_PORT,127.0.0.3:$KAFKA_PORT"
HZ="$(getconf CLK_TCK)"


all_in_sync() { # partitions: every partition of the idle-* topics has a leader and 3 in-sync replicas
    local n
    n="$("$SLUICE" cluster status --brokers "$BOOT" 2>/dev/null |
        awk '$1 ~ /^idle-/ && $3 != "-1" && split($6, isr, ",") == 3' | wc -l)"
    [ "$n" -eq "$1" ]
}

create_topic() { # name partitions: true once created (retried: the controller may move)
    local out
    out="$("$SLUICE" topic create "$1" -p "$2" -r 3 --brokers "$BOOT" 2>&1)" && return 0
    case "$out" in *"already exists"*) return 0 ;; esac
    sleep 0.5
    return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

raft_counter() { # node name
    curl -s "http://127.0.0.$1:$METRICS_PORT/metrics" |
        awk -v n="$2" '$1 ~ "^"n"\\{" {s += $2} END {printf "%d\n", s}'
}

for count in "${COUNTS[@]}"; do
    ctl="1@127.0.0.1:$INTERNAL_PORT,2@127.0.0.2:$INTERNAL_PORT,3@127.0.0.3:$INTERNAL_PORT"
    for n in 1 2 3; do
        # shellcheck disable=SC2086
        "$SLUICE" start --cores 1 --data-dir "$D/data$n" --node-id "$n" --controllers "$ctl" \
            --listen "127.0.0.$n:$KAFKA_PORT" --metrics-listen "127.0.0.$n:$METRICS_PORT" \
            $EXTRA_ARGS >"$D/broker$n.log" 2>&1 &
        PIDS+=($!)
    done
    wait_for 60 live_nodes
    # Topics of at most 100 partitions: one CreateTopics of 1,000 replicated partitions takes
    # longer than the client waits (debug builds).
    left=$count
    t=0
    while [ "$left" -gt 0 ]; do
        p=$((left < 100 ? left : 100))
        wait_for 60 create_topic "idle-$t" "$p"
        left=$((left - p))
        t=$((t + 1))
    done
    wait_for 300 all_in_sync "$count"
    sleep "$SETTLE"
    declare -A c0 m0 f0 b0
    for n in 1 2 3; do
        c0[$n]=$(cpu_ticks "${PIDS[$((n - 1))]}")
        m0[$n]=$(raft_counter "$n" sluice_raft_messages_sent_total)
        f0[$n]=$(raft_counter "$n" sluice_raft_frames_sent_total)
        b0[$n]=$(raft_counter "$n" sluice_raft_bytes_sent_total)
    done
    sleep "$WINDOW"
    for n in 1 2 3; do
        c1=$(cpu_ticks "${PIDS[$((n - 1))]}")
        m1=$(raft_counter "$n" sluice_raft_messages_sent_total)
        f1=$(raft_counter "$n" sluice_raft_frames_sent_total)
        b1=$(raft_counter "$n" sluice_raft_bytes_sent_total)
        awk -v p="$count" -v n="$n" -v c=$((c1 - c0[$n])) -v m=$((m1 - m0[$n])) \
            -v f=$((f1 - f0[$n])) -v b=$((b1 - b0[$n])) -v hz="$HZ" -v w="$WINDOW" 'BEGIN {
            printf "partitions %d node %d cpu_pct %.1f raft_msgs_per_s %.0f frames_per_s %.0f bytes_per_s %.0f\n",
                p, n, 100 * c / hz / w, m / w, f / w, b / w }'
    done
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    rm -rf "$D/data"*
done
