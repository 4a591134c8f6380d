#!/usr/bin/env bash
# Side by side: the same MQTT publish loads against edge-gateway, Mosquitto
# and RabbitMQ's MQTT plugin, on this machine, in this run. Prints a table of
# msgs/s and PUBACK latency with ratios edge-gateway / other.
#
#   benches/compare.sh              # one round
#   ROUNDS=2 benches/compare.sh     # rounds interleave the targets; medians
#   TARGETS="gateway mosquitto" benches/compare.sh
#   LOADS="1 1 20000 10;1 1 20000" INFLIGHT=100 benches/compare.sh
#   PROTO=v5 PAYLOAD=100 benches/compare.sh   # MQTT 5 (mqtt5-load), QoS 0/1/2
#
# A load is "qos publishers messages-per-publisher [subscribers [rate]]":
# with subscribers, that many clean-session QoS 1 subscribers to load/# each
# receive every message, and the rate column is deliveries/s with the
# publish-to-delivery latency beside it; rate paces each publisher (msgs/s).
# PROTO=v4 (the default) runs mqtt-load (MQTT 3.1.1, QoS 0 and 1);
# PROTO=v5 runs mqtt5-load (MQTT 5, QoS 0, 1 and 2, no subscribers or rate:
# a load is "qos publishers messages-per-publisher") against the gateway and
# Mosquitto only, as RabbitMQ's MQTT plugin (3.10) has no MQTT 5. Its QoS 2
# latency is PUBLISH to PUBCOMP, and any ack with a failure reason code
# fails the load.
# INFLIGHT (default 64) is the client's window and both the gateway's
# mqtt.max_inflight and Mosquitto's max_inflight_messages (outgoing QoS 1
# deliveries per client; its default is 20); Mosquitto's
# max_queued_messages is set to the gateway's per-connection queue, 1000.
#
# Needs mosquitto, mosquitto-clients (mosquitto_sub) and rabbitmq-server
# (Debian packages). Every server is private to this run: loopback only,
# free ports, data under a temporary directory, and stopped on exit whatever
# happens. Run as root, RabbitMQ drops to the `rabbitmq` user, so its
# directory is handed to that user.
#
# Durability is not equal across targets:
# - edge-gateway sends a QoS 1 PUBACK (QoS 2 PUBREC) after the message is
#   fsync'ed to its log.
# - RabbitMQ: a durable queue (a clean_session=false QoS 1 subscription on
#   load/#) takes every message, so QoS 1 publishes are persistent messages in
#   a durable queue and the PUBACK waits for the broker's confirm (on disk).
# - Mosquitto acknowledges from memory: `persistence true` is a periodic
#   snapshot, not a per-message fsync. Nobody subscribes there, so messages
#   are dropped after routing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
WAIT_PORT_STEP=0.2

ROUNDS=${ROUNDS:-1}
PROTO=${PROTO:-v4}
PAYLOAD=${PAYLOAD:-256}
INFLIGHT=${INFLIGHT:-64}
TIMEOUT=${TIMEOUT:-120}
case $PROTO in
v4)
    TARGETS=${TARGETS:-"gateway mosquitto rabbitmq"}
    # "qos publishers messages-per-publisher [subscribers [rate]]"
    LOADS=${LOADS:-"1 1 20000;1 8 10000;1 64 2000;0 8 50000"}
    LOAD_BIN=mqtt-load
    ;;
v5)
    TARGETS=${TARGETS:-"gateway mosquitto"}
    # "qos publishers messages-per-publisher"
    LOADS=${LOADS:-"1 4 10000;1 64 1000;2 4 10000;2 64 1000;0 4 50000;0 64 5000"}
    LOAD_BIN=mqtt5-load
    if [[ " $TARGETS " == *" rabbitmq "* ]]; then
        echo "note: PROTO=v5 skips rabbitmq (its MQTT plugin 3.10 has no MQTT 5)" >&2
        TARGETS=$(tr ' ' '\n' <<<"$TARGETS" | { grep -vx rabbitmq || true; } | xargs)
    fi
    ;;
*)
    echo "PROTO must be v4 or v5, not '$PROTO'" >&2
    exit 64
    ;;
esac
if [[ -z $TARGETS ]]; then
    echo "no target left to run" >&2
    exit 64
fi

# Every load is checked before a server starts.
IFS=';' read -ra specs <<<"$LOADS"
for spec in "${specs[@]}"; do
    read -r qos pubs msgs subs rate <<<"$spec"
    if [[ $PROTO == v4 && $qos != [01] ]] || [[ $PROTO == v5 && $qos != [012] ]]; then
        echo "load '$spec': QoS $qos is not measured with PROTO=$PROTO" >&2
        exit 64
    fi
    if [[ $PROTO == v5 && -n ${subs:-}${rate:-} ]]; then
        echo "load '$spec': PROTO=v5 has no subscribers or rate (mqtt5-load publishes only)" >&2
        exit 64
    fi
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

echo "== building (release)" >&2
cargo build --release -p edge-gateway -p edge-benches >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
GATEWAY=$BIN/edge-gateway
LOAD=$BIN/$LOAD_BIN

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
        stop_pid "$SERVER_PID" 100
        SERVER_PID=""
    fi
    stop_rabbitmq
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
max_inflight = $INFLIGHT
# Every load client connects from 127.0.0.1, all at once: the per-source
# handshake budget (32 by default, against floods) would close the oldest.
max_handshakes_per_source = 1024
[metrics]
enabled = false
# Every load client connects from 127.0.0.1: lift the per-source limits
# (256 connections, 100 new a second), which exist against floods.
[limits]
max_connections_per_source = 100000
connection_rate_per_source = 1000000
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
max_inflight_messages $INFLIGHT
max_queued_messages 1000
EOF
    if [[ $(id -u) -eq 0 ]]; then
        chown -R mosquitto: "$dir" 2>/dev/null || true
    fi
    mosquitto -c "$dir/mosquitto.conf" >"$dir/log" 2>&1 &
    SERVER_PID=$!
    wait_port "$PORT" 30
}

# Its own RabbitMQ, not lib.sh's: the MQTT plugin and listener and the
# durable sink; stop_rabbitmq (lib.sh) stops it.
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

# CPU time (user + system, clock ticks) the server process has used so far;
# empty for RabbitMQ (detached, several processes).
CLK_TCK=$(getconf CLK_TCK)
server_cpu_ticks() {
    if [[ -n $SERVER_PID && -r /proc/$SERVER_PID/stat ]]; then
        awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat"
    fi
}

run_loads() { # target round
    local target=$1 round=$2 spec qos pubs msgs subs rate line cpu0 cpu1
    IFS=';' read -ra specs <<<"$LOADS"
    for spec in "${specs[@]}"; do
        read -r qos pubs msgs subs rate <<<"$spec"
        if [[ $target == rabbitmq ]]; then before_load_rabbitmq; fi
        local extra=()
        if [[ $PROTO == v4 ]]; then
            extra=(--subscribers "${subs:-0}" --rate "${rate:-0}")
        fi
        cpu0=$(server_cpu_ticks)
        # In the background, so a signal runs the EXIT trap at once.
        "$LOAD" --port "$PORT" --publishers "$pubs" --messages "$msgs" --payload "$PAYLOAD" \
            --qos "$qos" --timeout "$TIMEOUT" --label "$target" --inflight "$INFLIGHT" \
            "${extra[@]}" >"$WORK/line" &
        LOAD_PID=$!
        if wait "$LOAD_PID"; then
            LOAD_PID=""
            line=$(cat "$WORK/line")
            cpu1=$(server_cpu_ticks)
            if [[ -n $cpu0 && -n $cpu1 ]]; then
                line="$line server_cpu_ms=$(((cpu1 - cpu0) * 1000 / CLK_TCK))"
            fi
            line="$line loadavg=$(cut -d' ' -f1 /proc/loadavg)"
            echo "   $line" >&2
            echo "$round $line" >>"$RESULTS"
            if [[ $target == rabbitmq ]]; then after_load_rabbitmq; fi
        else
            LOAD_PID=""
            echo "   $target qos=$qos publishers=$pubs: FAILED" >&2
            echo "$round label=$target qos=$qos publishers=$pubs subscribers=${subs:-0} rate=${rate:-0} msgs_per_s=FAILED" >>"$RESULTS"
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
if [[ $PROTO == v5 ]]; then
    echo "MQTT 5 (mqtt5-load), payload $PAYLOAD B, loopback, $INFLIGHT in flight, $ROUNDS round(s) (median of rounds);"
    echo "rate = msgs/s; latency = PUBACK (QoS 1) or PUBCOMP (QoS 2) p50/p99 ms, PUBLISH written to ack;"
    echo "CPU = the server's user+system time per message, median of rounds; loadavg at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
else
    echo "Payload $PAYLOAD B, loopback, $INFLIGHT in flight, $ROUNDS round(s) (median of rounds);"
    echo "rate = msgs/s, or deliveries/s with subscribers; latency = PUBACK p50/p99 ms, or"
    echo "publish-to-delivery p50/p99 ms with subscribers; CPU = the server's user+system time per"
    echo "message (per delivery with subscribers), median of rounds; loadavg at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
fi
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
    t = field("label"); subs = field("subscribers") + 0; rate = field("rate") + 0
    load = "QoS " field("qos") ", " field("publishers") " pub" (subs ? " → " subs " sub" : "") (rate ? " at " rate "/s" : "")
    if (!(load in seen)) { seen[load] = 1; order[++nl] = load }
    r = field(subs ? "deliveries_per_s" : "msgs_per_s"); if (field("msgs_per_s") == "FAILED") { failed[t, load] = 1; next }
    k = t SUBSEP load; count[k]++; vals[k, count[k]] = r; byround[k, $1] = r
    # Server CPU per message (or per delivery), in microseconds.
    c = field("server_cpu_ms"); n = field(subs ? "deliveries" : "messages")
    if (c != "" && n > 0) { ck = "cpu" SUBSEP k; count[ck]++; vals[ck, count[ck]] = c * 1000 / n }
    if (!($1 in rseen)) { rseen[$1] = 1; rounds[++nr] = $1 }
    p = subs ? "delivery" : "puback"
    lat[k] = lat[k] (lat[k] == "" ? "" : ", ") (field(p "_p50_ms") == "" ? "" : field(p "_p50_ms") "/" field(p "_p99_ms"))
    if (subs && field("lost") + 0 > 0) lat[k] = lat[k] " (lost " field("lost") ")"
}
END {
    nt = split(targets, tl, " ")
    printf "| load |"; for (i = 1; i <= nt; i++) printf " %s rate | %s latency |", tl[i], tl[i]
    for (i = 2; i <= nt; i++) printf " %s / %s | per round |", tl[1], tl[i]
    for (i = 1; i <= nt; i++) printf " %s CPU µs/unit |", tl[i]; printf "\n"
    printf "|---|"; for (i = 1; i <= nt; i++) printf "---:|---:|"; for (i = 2; i <= nt; i++) printf "---:|---|"
    for (i = 1; i <= nt; i++) printf "---:|"; printf "\n"
    for (l = 1; l <= nl; l++) {
        load = order[l]; printf "| %s |", load
        for (i = 1; i <= nt; i++) {
            k = tl[i] SUBSEP load; m[i] = median(k)
            printf " %s | %s |", ((tl[i], load) in failed) ? "FAILED" : (m[i] == "" ? "-" : sprintf("%.0f", m[i])), (lat[k] == "" ? "-" : lat[k])
        }
        for (i = 2; i <= nt; i++) {
            # The ratio of each round, and their median.
            delete rr; n = 0; per = ""
            for (j = 1; j <= nr; j++) {
                a = byround[tl[1], load, rounds[j]]; b = byround[tl[i], load, rounds[j]]
                if (a != "" && b != "" && b > 0) { rr[++n] = a / b; per = per (per == "" ? "" : " ") sprintf("%.2f", a / b) }
            }
            for (x = 1; x <= n; x++) for (y = x + 1; y <= n; y++) if (rr[y] < rr[x]) { tt = rr[x]; rr[x] = rr[y]; rr[y] = tt }
            med = (n == 0) ? "-" : sprintf("%.2f", (n % 2) ? rr[(n + 1) / 2] : (rr[n / 2] + rr[n / 2 + 1]) / 2)
            printf " %s | %s |", med, (per == "" ? "-" : per)
        }
        for (i = 1; i <= nt; i++) { c = median("cpu" SUBSEP tl[i] SUBSEP load); printf " %s |", (c == "" ? "-" : sprintf("%.2f", c)) }
        printf "\n"
    }
}' "$RESULTS"
