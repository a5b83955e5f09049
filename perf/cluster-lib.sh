# perf/cluster-lib.sh — sourced by the perf scripts that run a three-node cluster on 127.0.0.1-3
# (raft_failover.sh, raft_idle.sh, replicated.sh), after they set SLUICE (the broker binary).
# Gives them: D, a fresh temporary directory removed at exit; PIDS, the processes they start
# (append each one), stopped at exit; `wait_for SECONDS COMMAND...`, which polls COMMAND every
# 0.1 s until it succeeds or the time is up; and `live_nodes`, true once all three nodes answer
# `cluster status` as live (it reads BOOT, the bootstrap list, set by the script).
D="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$D"
}
trap cleanup EXIT

wait_for() { # seconds command...
    local limit=$(($1 * 10))
    shift
    for _ in $(seq "$limit"); do
        "$@" && return 0
        sleep 0.1
    done
    echo "timed out waiting for: $*" >&2
    return 1
}

live_nodes() { [ "$("$SLUICE" cluster status --brokers "$BOOT" 2>/dev/null | grep -c ' live')" -ge 3 ]; }
