#!/usr/bin/env bash
# The AMQP figures of issue 8, edge-gateway beside RabbitMQ, on this machine,
# in this run. Both servers are private: loopback only, free ports, data under
# a temporary directory, stopped on exit whatever happens (run as root,
# RabbitMQ drops to the `rabbitmq` user). Loads are `amqp-load` (lapin).
#
#   benches/amqp-figures.sh            # ROUNDS=3 SECONDS_PER_LOAD=5
#
# Rounds are interleaved (every case on both servers, the order alternating
# per round); the ratio is gateway / RabbitMQ within a round, the summary its
# median over rounds. Prints key=value lines, then a summary.
set -euo pipefail
export PATH=$PATH:/usr/sbin
source "$(dirname "$0")/lib.sh"
WAIT_PORT_STEP=0.2

ROUNDS=${ROUNDS:-3}
SECONDS_PER_LOAD=${SECONDS_PER_LOAD:-5}
PAYLOAD=${PAYLOAD:-256}
FILL=${FILL:-50000}
PREFETCH=${PREFETCH:-1000}
IDLE=${IDLE:-1000}
# "publishers window"
PUBLISH_LOADS=${PUBLISH_LOADS:-"1 100;1 1000;4 100;4 1000"}
CASES=${CASES:-"publish consume idle"}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
GATEWAY=$BIN/edge-gateway
LOAD=$BIN/amqp-load
for b in "$GATEWAY" "$LOAD"; do
    [[ -x $b ]] || { echo "no $b (cargo build --release -p edge-gateway -p edge-benches)" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || true

WORK=$(mktemp -d /tmp/edge-amqp-figures.XXXXXX)
chmod 755 "$WORK"
GW_PID=""
RMQ_NODE=""
RMQ_DIR=$WORK/rabbitmq
RMQ_ENV=()

stop_servers() {
    if [[ -n $GW_PID ]]; then
        stop_pid "$GW_PID" 100
        GW_PID=""
    fi
    stop_rabbitmq
}
cleanup() {
    stop_servers
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_gateway() {
    local dir=$WORK/gateway
    mkdir -p "$dir"
    local mqtt amqp metrics
    mqtt=$(free_port) amqp=$(free_port) metrics=$(free_port)
    cat >"$dir/gateway.toml" <<EOF
[gateway]
id = "amqp-figures"
data_dir = "$dir/data"
[mqtt]
listen = "127.0.0.1:$mqtt"
[amqp]
listen = "127.0.0.1:$amqp"
max_connections = $((IDLE + 64))
[metrics]
listen = "127.0.0.1:$metrics"
[store]
max_bytes = "16GiB"
# Every load client connects from 127.0.0.1: lift the per-source limits
# (256 connections, 100 new a second), which exist against floods.
[limits]
max_connections_per_source = 100000
connection_rate_per_source = 1000000
EOF
    "$GATEWAY" --config "$dir/gateway.toml" >"$dir/log" 2>&1 &
    GW_PID=$!
    wait_port "$amqp" 30
    GW_URI="amqp://guest:guest@127.0.0.1:$amqp/%2f"
}

start_gateway
start_rabbitmq amqpfig
echo "loadavg_start=$(loadavg) rabbitmq=$RMQ_VERSION payload=$PAYLOAD rounds=$ROUNDS seconds=$SECONDS_PER_LOAD"

run() { # kind args... -> prints the result line with kind, round, loadavg
    local kind=$1 uri
    shift
    [[ $kind == gateway ]] && uri=$GW_URI || uri=$RMQ_URI
    local line
    if ! line=$("$LOAD" --uri "$uri" --payload "$PAYLOAD" --queue "bench-$CASE_TAG" "$@"); then
        echo "kind=$kind round=$ROUND case=$CASE_TAG FAILED loadavg=$(loadavg)" >&2
        return 0
    fi
    echo "kind=$kind round=$ROUND case=$CASE_TAG $line loadavg=$(loadavg)" | tee -a "$WORK/lines"
}

order() { # round -> the two kinds, alternating
    if (($1 % 2)); then echo "rabbitmq gateway"; else echo "gateway rabbitmq"; fi
}

for ROUND in $(seq 1 "$ROUNDS"); do
    for case in $CASES; do
        case $case in
        publish)
            IFS=';' read -ra loads <<<"$PUBLISH_LOADS"
            for load in "${loads[@]}"; do
                read -r p w <<<"$load"
                CASE_TAG="publish-p$p-w$w"
                for kind in $(order "$ROUND"); do
                    run "$kind" publish --publishers "$p" --window "$w" --seconds "$SECONDS_PER_LOAD"
                done
            done
            ;;
        consume)
            CASE_TAG="consume-pf$PREFETCH"
            for kind in $(order "$ROUND"); do
                run "$kind" consume --fill "$FILL" --prefetch "$PREFETCH"
            done
            ;;
        idle)
            # Once is enough (not a rate); in the first round only.
            if ((ROUND == 1)); then
                CASE_TAG="idle"
                for kind in gateway rabbitmq; do
                    [[ $kind == gateway ]] && pid=$GW_PID || pid=$RMQ_PID
                    run "$kind" idle --connections "$IDLE" --pid "$pid"
                done
            fi
            ;;
        esac
    done
done
echo "loadavg_end=$(loadavg)"

# Summary: per case, the median over rounds of each server's figure and of
# the per-round ratio gateway / RabbitMQ.
python3 - "$WORK/lines" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split()) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
print("== summary (median over rounds; ratio = gateway / rabbitmq within a round)")
for c in cases:
    key = "kib_per_conn" if c == "idle" else "msgs_per_s"
    by = {}
    for r in rows:
        if r["case"] == c:
            by.setdefault(r["round"], {})[r["kind"]] = float(r[key])
    g = [v["gateway"] for v in by.values() if len(v) == 2]
    q = [v["rabbitmq"] for v in by.values() if len(v) == 2]
    ratios = [v["gateway"] / v["rabbitmq"] for v in by.values() if len(v) == 2 and v["rabbitmq"]]
    print(f"{c}: {key} gateway={statistics.median(g):.1f} rabbitmq={statistics.median(q):.1f} "
          f"ratio={statistics.median(ratios):.2f} rounds={len(ratios)} "
          f"per_round={','.join(f'{x:.2f}' for x in ratios)}")
PY
