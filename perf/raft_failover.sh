#!/usr/bin/env bash
# Failover time of a replicated partition next to the 50 raft groups of `__consumer_offsets`
# (RF 3, the default): a three-node cluster (127.0.0.1-3, `--cores 1` each), a topic of one
# partition at RF 3; kill -9 of that partition's leader, then `sluice produce --acks all` to the
# survivors, retried until one is acknowledged. Prints the time from the kill to that
# acknowledgement, one line per round. Between rounds the killed node restarts on its data and
# every partition is back in sync.
#
#   perf/raft_failover.sh [ROUNDS]          # default: 3
#
# SLUICE picks the binary (default target/release/sluice); EXTRA_ARGS are added to every
# `sluice start`.
set -euo pipefail
ROUNDS="${1:-3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SLUICE="${SLUICE:-$REPO/target/release/sluice}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
# D, PIDS (stopped and removed at exit), wait_for, live_nodes.
source "$REPO/perf/cluster-lib.sh"

KAFKA_PORT="${KAFKA_PORT:-19791}"
INTERNAL_PORT="${INTERNAL_PORT:-19801}"
BOOT="127.0.0.1:$KAFKA_PORT,127.0.0.2:$KAFKA_PORT,127.0.0.3:$KAFKA_PORT"


# Partitions of a topic with a leader and three in-sync replicas, as node 1 reports them.
in_sync() { # topic count
    local n
    n="$("$SLUICE" cluster status --brokers "$BOOT" --topic "$1" 2>/dev/null |
        awk -v t="$1" '$1 == t && $3 != "-1" && split($6, isr, ",") == 3' | wc -l)"
    [ "$n" -eq "$2" ]
}

create_topic() { # name partitions
    local out
    out="$("$SLUICE" topic create "$1" -p "$2" -r 3 --brokers "$BOOT" 2>&1)" && return 0
    case "$out" in *"already exists"*) return 0 ;; esac
    sleep 0.5
    return 1
}

produced() { # brokers (comma-separated): true once one of them acknowledges a record
    # `sluice produce` sends to the broker it connects to (no leader routing): ask each.
    local b
    for b in ${1//,/ }; do
        echo "after" | timeout 5 "$SLUICE" produce fo -p 0 --acks all --brokers "$b" \
            >/dev/null 2>&1 && return 0
    done
    return 1
}

start_node() { # n
    # shellcheck disable=SC2086
    "$SLUICE" start --cores 1 --data-dir "$D/data$1" --node-id "$1" --controllers "$CTL" \
        --listen "127.0.0.$1:$KAFKA_PORT" $EXTRA_ARGS >>"$D/broker$1.log" 2>&1 &
    PIDS[$1 - 1]=$!
}

CTL="1@127.0.0.1:$INTERNAL_PORT,2@127.0.0.2:$INTERNAL_PORT,3@127.0.0.3:$INTERNAL_PORT"
for n in 1 2 3; do start_node "$n"; done
wait_for 60 live_nodes
wait_for 60 create_topic fo 1
for round in $(seq "$ROUNDS"); do
    wait_for 120 in_sync fo 1
    wait_for 120 in_sync __consumer_offsets 50
    wait_for 60 produced "$BOOT"
    leader="$("$SLUICE" cluster status --brokers "$BOOT" --topic fo | awk '$1 == "fo" {print $3}')"
    survivors=""
    for n in 1 2 3; do
        [ "$n" = "$leader" ] || survivors="$survivors,127.0.0.$n:$KAFKA_PORT"
    done
    start=$(date +%s.%N)
    kill -9 "${PIDS[$((leader - 1))]}"
    wait_for 60 produced "${survivors#,}"
    end=$(date +%s.%N)
    awk -v r="$round" -v l="$leader" -v s="$start" -v e="$end" \
        'BEGIN { printf "round %d leader %d killed: first acks=all produce acknowledged after %.2f s\n", r, l, e - s }'
    # The killed node comes back (same data) before the next round.
    wait "${PIDS[$((leader - 1))]}" 2>/dev/null || true
    start_node "$leader"
    wait_for 60 live_nodes
done
