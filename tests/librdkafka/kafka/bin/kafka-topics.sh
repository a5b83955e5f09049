#!/usr/bin/env bash
# A stand-in for Kafka's kafka-topics.sh, for librdkafka's tests that shell out to it
# (test_kafka_topics: 0045, 0052, 0077): maps the options they use onto the `sluice topic`
# commands. $SLUICE_BIN is the sluice binary.
set -euo pipefail
: "${SLUICE_BIN:?SLUICE_BIN must name the sluice binary}"
brokers="" action="" topic="" partitions="" rf="" configs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bootstrap-server) brokers=$2; shift 2 ;;
        --create | --alter | --delete | --list | --describe) action=${1#--}; shift ;;
        --topic) topic=$2; shift 2 ;;
        --partitions) partitions=$2; shift 2 ;;
        --replication-factor) rf=$2; shift 2 ;;
        --config) configs+=(-c "$2"); shift 2 ;;
        --if-not-exists | --if-exists) shift ;;
        *) echo "kafka-topics.sh (sluice stand-in): unsupported option $1" >&2; exit 2 ;;
    esac
done
[ -n "$brokers" ] || { echo "kafka-topics.sh: --bootstrap-server is required" >&2; exit 2; }
case "$action" in
    create) exec "$SLUICE_BIN" topic create "$topic" ${partitions:+-p "$partitions"} ${rf:+-r "$rf"} \
        "${configs[@]}" --brokers "$brokers" ;;
    alter) [ -n "$partitions" ] || { echo "kafka-topics.sh: --alter needs --partitions" >&2; exit 2; }
        exec "$SLUICE_BIN" topic add-partitions "$topic" -p "$partitions" --brokers "$brokers" ;;
    delete) exec "$SLUICE_BIN" topic delete "$topic" --brokers "$brokers" ;;
    list) exec "$SLUICE_BIN" topic list --brokers "$brokers" ;;
    describe) exec "$SLUICE_BIN" topic describe "$topic" --brokers "$brokers" ;;
    *) echo "kafka-topics.sh: one of --create --alter --delete --list --describe is required" >&2; exit 2 ;;
esac
