#!/usr/bin/env bash
# Side by side: the same MQTT publish loads against edge-gateway, Mosquitto
# and RabbitMQ's MQTT plugin, on this machine, in this run. Prints a table of
# msgs/s and PUBACK latency with ratios edge-gateway / other.
#
#   benches/compare.sh              # one round
#   ROUNDS=2 benches/compare.sh     # rounds interleave the targets; medians
#   TARGETS="gateway mosquitto" benches/compare.sh
#
# Needs mosquitto, mosquitto-clients (mosquitto_sub) and rabbitmq-server
# (Debian packages). Every server is private to this run: loopback only,
# free ports, data under a temporary directory, and stopped on exit whatever
# happens. Run as root, RabbitMQ drops to the `rabbitmq` user, so its
# directory is handed to that user.
#
# Durability is not equal across targets:
# - edge-gateway sends a QoS 1 PUBACK after the message is fsync'ed to its log.
# - RabbitMQ: a durable queue (a clean_session=false QoS 1 subscription on
#   load/#) takes every message, so QoS 1 publishes are persistent messages in
#   a durable queue and the PUBACK waits for the broker's confirm (on disk).
# - Mosquitto acknowledges from memory: `persistence true` is a periodic
#   snapshot, not a per-message fsync. Nobody subscribes there, so messages
#   are dropped after routing.
set -euo pipefail

ROUNDS=${ROUNDS:-1}
TARGETS=${TARGETS:-"gateway mosquitto rabbitmq"}
PAYLOAD=${PAYLOAD:-256}
TIMEOUT=${TIMEOUT:-120}
# "qos publishers messages-per-publisher"
LOADS=${LOADS:-"1 1 20000;1 8 10000;1 64 2000;0 8 50000"}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

echo "== building (release)" >&2
cargo build --release -p edge-gateway -p edge-benches >&2
GATEWAY=$ROOT/target/release/edge-gateway
LOAD=$ROOT/target/release/mqtt-load

WORK=$(mktemp -d /tmp/edge-compare.XXXXXX)
chmod 755 "$WORK"
RESULTS=$WORK/results
: >"$RESULTS"
SERVER_PID=""
LOAD_PID=""
RMQ_NODE=""
RMQ_ENV=()

stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    if [[ -n $RMQ_NODE ]]; then
        local pid=""
        [[ -f $RMQ_DIR/pid ]] && pid=$(cat "$RMQ_DIR/pid" 2>/dev/null || true)
        env "${RMQ_ENV[@]}" timeout 60 rabbitmqctl -n "$RMQ_NODE" stop "$RMQ_DIR/pid" >/dev/null 2>&1 || true
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        RMQ_NODE=""
    fi
}

cleanup() {
    if [[ -n $LOAD_PID ]]; then
        kill -TERM "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port seconds
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$1 after $2 s" >&2
    return 1
}

start_gateway() {
    local dir=$WORK/gateway
    rm -rf "$dir"
    mkdir -p "$dir"
    PORT=$(free_port)
    cat >"$dir/gateway.toml" <<EOF
[gateway]
id = "compare"
data_dir = "$dir/data"
[mqtt]
listen = "127.0.0.1:$PORT"
[metrics]
enabled = false
EOF
    "$GATEWAY" --config "$dir/gateway.toml" >"$dir/log" 2>&1 &
    SERVER_PID=$!
    wait_port "$PORT" 30
}

start_mosquitto() {
    local dir=$WORK/mosquitto
    rm -rf "$dir"
    mkdir -p "$dir/data"
    PORT=$(free_port)
    cat >"$dir/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $dir/data/
log_dest stderr
EOF
    if [[ $(id -u) -eq 0 ]]; then
        chown -R mosquitto: "$dir" 2>/dev/null || true
    fi
    mosquitto -c "$dir/mosquitto.conf" >"$dir/log" 2>&1 &
    SERVER_PID=$!
    wait_port "$PORT" 30
}

RMQ_DIR=""
start_rabbitmq() {
    RMQ_DIR=$WORK/rabbitmq
    rm -rf "$RMQ_DIR"
    mkdir -p "$RMQ_DIR/mnesia" "$RMQ_DIR/log" "$RMQ_DIR/home"
    PORT=$(free_port)
    local amqp dist
    amqp=$(free_port)
    dist=$(free_port)
    echo '[rabbitmq_mqtt].' >"$RMQ_DIR/enabled_plugins"
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
mqtt.listeners.tcp.1 = 127.0.0.1:$PORT
mqtt.allow_anonymous = true
EOF
    if [[ $(id -u) -eq 0 ]]; then
        chown -R rabbitmq:rabbitmq "$RMQ_DIR"
    fi
    RMQ_NODE="cmp-$$@localhost"
    RMQ_ENV=(
        RABBITMQ_NODENAME="$RMQ_NODE"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$amqp"
        RABBITMQ_DIST_PORT="$dist"
        RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
        RABBITMQ_LOG_BASE="$RMQ_DIR/log"
        RABBITMQ_PID_FILE="$RMQ_DIR/pid"
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
        RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        ERL_EPMD_ADDRESS=127.0.0.1
        HOME="$RMQ_DIR/home"
    )
    env "${RMQ_ENV[@]}" rabbitmq-server -detached >"$WORK/rabbitmq-start.log" 2>&1
    env "${RMQ_ENV[@]}" timeout 90 rabbitmqctl -n "$RMQ_NODE" wait "$RMQ_DIR/pid" --timeout 60 >/dev/null
    wait_port "$PORT" 30
    # The durable sink: a persistent session's QoS 1 subscription is a
    # durable queue bound to amq.topic with load.#.
    timeout 20 mosquitto_sub -h 127.0.0.1 -p "$PORT" -i compare-sink -c -q 1 -t 'load/#' -W 2 \
        >/dev/null 2>&1 || true
    local queues
    queues=$(env "${RMQ_ENV[@]}" timeout 30 rabbitmqctl -n "$RMQ_NODE" -q list_queues name durable)
    if ! grep -q 'mqtt-subscription-compare-sinkqos1[[:space:]]*true' <<<"$queues"; then
        echo "RabbitMQ: the durable sink queue is missing: $queues" >&2
        return 1
    fi
}

# Empties the sink so every load starts on an empty queue.
before_load_rabbitmq() {
    env "${RMQ_ENV[@]}" timeout 30 rabbitmqctl -n "$RMQ_NODE" -q purge_queue \
        mqtt-subscription-compare-sinkqos1 >/dev/null
}

# Shows that the sink took the messages (and how many are persistent).
after_load_rabbitmq() {
    env "${RMQ_ENV[@]}" timeout 30 rabbitmqctl -n "$RMQ_NODE" -q list_queues \
        name durable messages messages_persistent | sed 's/^/     sink: /' >&2 || true
}

run_loads() { # target round
    local target=$1 round=$2 spec qos pubs msgs line
    IFS=';' read -ra specs <<<"$LOADS"
    for spec in "${specs[@]}"; do
        read -r qos pubs msgs <<<"$spec"
        if [[ $target == rabbitmq ]]; then before_load_rabbitmq; fi
        # In the background, so a signal runs the EXIT trap at once.
        "$LOAD" --port "$PORT" --publishers "$pubs" --messages "$msgs" --payload "$PAYLOAD" \
            --qos "$qos" --timeout "$TIMEOUT" --label "$target" >"$WORK/line" &
        LOAD_PID=$!
        if wait "$LOAD_PID"; then
            LOAD_PID=""
            line=$(cat "$WORK/line")
            echo "   $line" >&2
            echo "$round $line" >>"$RESULTS"
            if [[ $target == rabbitmq ]]; then after_load_rabbitmq; fi
        else
            LOAD_PID=""
            echo "   $target qos=$qos publishers=$pubs: FAILED" >&2
            echo "$round label=$target qos=$qos publishers=$pubs msgs_per_s=FAILED" >>"$RESULTS"
        fi
    done
}

for round in $(seq 1 "$ROUNDS"); do
    for target in $TARGETS; do
        echo "== round $round: $target" >&2
        "start_$target"
        run_loads "$target" "$round"
        stop_server
    done
done

echo
echo "Payload $PAYLOAD B, loopback, $ROUNDS round(s) (median of rounds); latency = PUBACK p50/p99 ms."
echo
awk -v targets="$TARGETS" '
function field(name,   i, kv) {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] }
    return ""
}
function median(key,   n, i, j, t, v) {
    n = count[key]; if (n == 0) return ""
    for (i = 1; i <= n; i++) v[i] = vals[key, i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
{
    t = field("label"); load = "QoS " field("qos") ", " field("publishers") " pub"
    if (!(load in seen)) { seen[load] = 1; order[++nl] = load }
    r = field("msgs_per_s"); if (r == "FAILED") { failed[t, load] = 1; next }
    k = t SUBSEP load; count[k]++; vals[k, count[k]] = r
    lat[k] = lat[k] (lat[k] == "" ? "" : ", ") (field("puback_p50_ms") == "" ? "" : field("puback_p50_ms") "/" field("puback_p99_ms"))
}
END {
    nt = split(targets, tl, " ")
    printf "| load |"; for (i = 1; i <= nt; i++) printf " %s msgs/s | %s latency |", tl[i], tl[i]
    for (i = 2; i <= nt; i++) printf " %s / %s |", tl[1], tl[i]; printf "\n"
    printf "|---|"; for (i = 1; i <= nt; i++) printf "---:|---:|"; for (i = 2; i <= nt; i++) printf "---:|"; printf "\n"
    for (l = 1; l <= nl; l++) {
        load = order[l]; printf "| %s |", load
        for (i = 1; i <= nt; i++) {
            k = tl[i] SUBSEP load; m[i] = median(k)
            printf " %s | %s |", ((tl[i], load) in failed) ? "FAILED" : (m[i] == "" ? "-" : sprintf("%.0f", m[i])), (lat[k] == "" ? "-" : lat[k])
        }
        for (i = 2; i <= nt; i++) printf " %s |", ratio(m[1], m[i])
        printf "\n"
    }
}' "$RESULTS"
