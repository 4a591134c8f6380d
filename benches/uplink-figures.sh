#!/usr/bin/env bash
# The uplink figures of issue 9, in one run on this machine: RabbitMQ's own
# confirmed publish rate, the gateway draining a 1,000,000-message backlog
# into that RabbitMQ, the time to the first confirm and to a live
# high-priority message during the drain, and the bytes the gateway writes
# to disk per message. RabbitMQ and every gateway are private: loopback only,
# free ports, data under a temporary directory, stopped on exit whatever
# happens (run as root: RabbitMQ drops to the `rabbitmq` user, and
# /proc/<pid>/io of the gateway must be readable).
#
#   benches/uplink-figures.sh
#   BEFORE_BIN=/path/to/release benches/uplink-figures.sh   # + "before" disk figures
#   RMQ_ONE=3 benches/uplink-figures.sh   # only RabbitMQ: 1 publisher vs 4, 3 rounds, with its CPU
#   DRAIN_CASES="1000:9 1000:0" TRICKLE=0 BURST_UP=0 RMQ_VOLUME=0 benches/uplink-figures.sh  # drains only
#
# Phases:
#
# 1. `amqp-load publish` against RabbitMQ: PUBLISHERS publishers, WINDOW
#    unconfirmed each, PAYLOAD-byte persistent messages into a durable queue
#    through the default exchange; for RMQ_SECONDS at the start and just
#    before and after every drain (the drain's ratio is to the mean of those
#    two: the machine is shared, its load moves), and once for BACKLOG
#    messages (the same volume as the drain). Each timed run is followed by
#    one with `--shape GATEWAY_SHAPE` (gateway-lean: the properties, header
#    table and mandatory flag the gateway publishes with), the rate RabbitMQ
#    takes the gateway's own messages at.
# 2. Per item W:P of DRAIN_CASES (W the gateway's upstream.max_in_flight, P
#    the priority of the alarm route; P = 0 puts both routes in one lane, the
#    drain as it was before priority lanes): the
#    RabbitMQ application is stopped (`rabbitmqctl stop_app`: the node stays,
#    its AMQP port refuses), a fresh gateway whose upstream is that port
#    takes BACKLOG QoS 1 messages from `mqtt-load` (FILL_PUBLISHERS x
#    FILL_INFLIGHT in flight) on load/<n> (route "bulk", priority 0, default
#    exchange -> durable queue uplink-bulk). Then `rabbitmqctl start_app`:
#    "broker back" is the first moment its AMQP port accepts a connection
#    (a probe tries every 10 ms); the gateway reconnects within its
#    reconnect_max (200ms here). A poller reads /metrics every POLL_MS:
#    edge_upstream_link_up, edge_messages_forwarded_total per route. Drain
#    rate = BACKLOG / (first sample with the link up -> first sample with
#    every bulk message confirmed); an event's time is that of the first
#    sample that shows it (so up to POLL_MS late). ALARM_DELAY seconds after the link came
#    up, `mosquitto_pub -q 1` publishes one message on alarms/site-1 (route
#    "alarm", priority P, -> durable queue uplink-alarm, purged first, where
#    `amqp-consume` waits and stamps its arrival; afterwards that queue must
#    be empty and the gateway must have forwarded exactly one alarm, both
#    printed). Also the CPU the gateway and RabbitMQ's node used from the
#    link coming up to the last confirm (% of one core).
# 3. Disk: write_bytes of /proc/<gateway pid>/io around the fill above (the
#    upstream down: every message stays in the log), around a burst of
#    BURST_UP messages the same way into a fresh gateway whose upstream is
#    up (read once it counts all of them forwarded and the log is empty:
#    a burst faster than the uplink, most of it a backlog), around the same
#    messages in BURST_ROUNDS short bursts (each forwarded and retired
#    before the next: spikes the uplink absorbs), and around a trickle of
#    TRICKLE messages at 1/s from one QoS 1 client into a fresh gateway whose
#    upstream is up (each message is forwarded and retired). A reading is
#    taken once write_bytes has not moved for 2 s. The gateways' logs go
#    through a pipe to `cat`, so their lines are not counted as theirs.
#    With BEFORE_BIN (a release dir holding an older edge-gateway) the same
#    fill, bursts and trickle run on that binary too.
#
# Prints key=value lines, then a summary.
set -euo pipefail
export PATH=$PATH:/usr/sbin
source "$(dirname "$0")/lib.sh"

PAYLOAD=${PAYLOAD:-100}
BACKLOG=${BACKLOG:-1000000}
PUBLISHERS=${PUBLISHERS:-4}
WINDOW=${WINDOW:-1000}
RMQ_SECONDS=${RMQ_SECONDS:-10}
DRAIN_CASES=${DRAIN_CASES:-"1000:9 256:9 4000:9 1000:0"}
FILL_PUBLISHERS=${FILL_PUBLISHERS:-4}
FILL_INFLIGHT=${FILL_INFLIGHT:-100}
ALARM_DELAY=${ALARM_DELAY:-3}
POLL_MS=${POLL_MS:-20}
TRICKLE=${TRICKLE:-61} # 0: no trickle
BURST_UP=${BURST_UP:-400000} # 0: no burst with the upstream up
BURST_ROUNDS=${BURST_ROUNDS:-40} # the same messages again as this many short bursts (0, 1: not)
BEFORE_BIN=${BEFORE_BIN:-}
RMQ_ONE=${RMQ_ONE:-}
RMQ_VOLUME=${RMQ_VOLUME:-1} # 0: skip RabbitMQ's BACKLOG-message run
# amqp-load's shape of what the gateway publishes (properties, headers,
# mandatory); each RabbitMQ run is repeated with it. "": plain runs only.
GATEWAY_SHAPE=${GATEWAY_SHAPE-gateway-lean}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
GATEWAY=$BIN/edge-gateway
AMQP_LOAD=$BIN/amqp-load
MQTT_LOAD=$BIN/mqtt-load
for b in "$GATEWAY" "$AMQP_LOAD" "$MQTT_LOAD"; do
    [[ -x $b ]] || { echo "no $b (cargo build --release -p edge-gateway -p edge-benches)" >&2; exit 1; }
done
if [[ -n $BEFORE_BIN && ! -x $BEFORE_BIN/edge-gateway ]]; then
    echo "no $BEFORE_BIN/edge-gateway" >&2
    exit 1
fi
for t in mosquitto_pub amqp-consume amqp-declare-queue rabbitmq-server rabbitmqctl python3 curl; do
    command -v "$t" >/dev/null || { echo "$t is needed" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || true

WORK=$(mktemp -d /tmp/edge-uplink-figures.XXXXXX)
chmod 755 "$WORK"
GW_PID=""
BG_PIDS=()
RMQ_NODE=""
RMQ_DIR=$WORK/rabbitmq
RMQ_ENV=()

stop_gateway() {
    if [[ -n $GW_PID ]]; then
        stop_pid "$GW_PID" 200
        GW_PID=""
    fi
}
stop_all() {
    for pid in "${BG_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    BG_PIDS=()
    stop_gateway
    stop_rabbitmq
}
cleanup() {
    stop_all
    [[ -n ${KEEP_WORK:-} ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

write_bytes() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io"; }

# write_bytes of pid once it has not moved for 2 s (at most 60 s).
settled_write_bytes() {
    local last now_b stable=0
    last=$(write_bytes "$1")
    for _ in $(seq 1 120); do
        sleep 0.5
        now_b=$(write_bytes "$1")
        if [[ $now_b == "$last" ]]; then
            stable=$((stable + 1))
            ((stable >= 4)) && break
        else
            stable=0
            last=$now_b
        fi
    done
    echo "$last"
}

# start_gateway BIN NAME UPSTREAM_PORT MAX_IN_FLIGHT [ALARM_PRIORITY]: a
# fresh data dir; sets GW_PID, GW_MQTT, GW_METRICS.
start_gateway() {
    local bin=$1 name=$2 upstream_port=$3 in_flight=$4 alarm_priority=${5:-9}
    local dir=$WORK/gw-$name
    rm -rf "$dir"
    mkdir -p "$dir"
    GW_MQTT=$(free_port) GW_METRICS=$(free_port)
    cat >"$dir/gateway.toml" <<EOF
[gateway]
id = "uplink-figures"
data_dir = "$dir/data"
[mqtt]
listen = "127.0.0.1:$GW_MQTT"
[amqp]
enabled = false
[metrics]
listen = "127.0.0.1:$GW_METRICS"
[store]
max_bytes = "16GiB"
[limits]
max_connections_per_source = 100000
connection_rate_per_source = 1000000
[[upstream]]
name = "central"
uris = ["amqp://guest:guest@127.0.0.1:$upstream_port/%2f"]
max_in_flight = $in_flight
reconnect_min = "50ms"
reconnect_max = "200ms"
[[route]]
name = "alarm"
filter = "alarms/#"
upstream = "central"
exchange = ""
routing_key = "uplink-alarm"
priority = $alarm_priority
[[route]]
name = "bulk"
filter = "load/#"
upstream = "central"
exchange = ""
routing_key = "uplink-bulk"
priority = 0
EOF
    # Logs through a pipe: what `cat` writes is not the gateway's write_bytes.
    "$bin" --config "$dir/gateway.toml" > >(cat >"$dir/log") 2>&1 &
    GW_PID=$!
    wait_port "$GW_MQTT" 30
    wait_port "$GW_METRICS" 30
}

# The poller: samples /metrics every POLL_MS ms, one line per change:
# "unix_time link_up forwarded_bulk forwarded_alarm" per sample; ends once
# bulk >= target.
cat >"$WORK/poll.py" <<'PY'
import re, sys, time, urllib.request
port, out, target, interval, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
url = f"http://127.0.0.1:{port}/metrics"
def value(text, name, label):
    total = None
    for m in re.finditer(r"^" + name + r"\{([^}]*)\} (\S+)$", text, re.M):
        if label is None or label in m.group(1):
            total = (total or 0) + float(m.group(2))
    return int(total or 0)
deadline = time.time() + limit
with open(out, "w", buffering=1) as f:
    while time.time() < deadline:
        t = time.time()
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            time.sleep(interval)
            continue
        row = (value(text, "edge_upstream_link_up", None),
               value(text, "edge_messages_forwarded_total", 'route="bulk"'),
               value(text, "edge_messages_forwarded_total", 'route="alarm"'))
        f.write(f"{t:.6f} {row[0]} {row[1]} {row[2]}\n")
        if row[1] >= target:
            break
        time.sleep(max(0.0, interval - (time.time() - t)))
PY

# The port probe: the time RabbitMQ's AMQP port first accepts a connection
# (tried every 10 ms).
cat >"$WORK/probe.py" <<'PY'
import socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
deadline = time.time() + 120
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.05).close()
    except OSError:
        time.sleep(0.01)
        continue
    open(out, "w").write(f"{time.time():.6f}\n")
    break
PY

fill() { # label: BACKLOG QoS 1 messages into the gateway; prints the result line
    local per=$((BACKLOG / FILL_PUBLISHERS))
    local before after line
    before=$(settled_write_bytes "$GW_PID")
    line=$("$MQTT_LOAD" --port "$GW_MQTT" --publishers "$FILL_PUBLISHERS" --messages "$per" \
        --payload "$PAYLOAD" --qos 1 --inflight "$FILL_INFLIGHT" --timeout 900)
    after=$(settled_write_bytes "$GW_PID")
    local n=$((per * FILL_PUBLISHERS))
    echo "case=fill gateway=$1 $line write_bytes=$((after - before)) bytes_per_msg=$(python3 -c "print(f'{($after - $before) / $n:.1f}')") loadavg=$(loadavg)"
}

# gateway_metric REGEX: the sum of the gateway's /metrics samples whose
# line (name and labels) matches REGEX (0 when none does).
gateway_metric() {
    curl -s "http://127.0.0.1:$GW_METRICS/metrics" |
        awk -v re="$1" '$0 ~ re {n += $NF} END {print n + 0}'
}

# wait_metric REGEX OP VALUE SECONDS: until gateway_metric REGEX OP VALUE
# holds (OP an arithmetic comparison, e.g. ">=", "=="); says what it saw.
wait_metric() {
    local deadline=$((SECONDS + $4)) n
    while ((SECONDS < deadline)); do
        n=$(gateway_metric "$1")
        (("$n" $2 $3)) && return 0
        sleep 0.2
    done
    echo "$1 is $n after $4 s, not $2 $3" >&2
    return 1
}

# wait_forwarded N SECONDS: until the gateway counts N bulk messages forwarded.
wait_forwarded() { wait_metric '^edge_messages_forwarded_total\{.*route="bulk"' ">=" "$1" "$2"; }

# wait_retired SECONDS: until the gateway's log is empty (every message
# forwarded and its cursor move committed: that commit is lazy, up to a few
# seconds late, and belongs in the reading).
wait_retired() { wait_metric '^edge_store_live_messages ' "==" 0 "$1"; }

burst_up() { # label ROUNDS: BURST_UP QoS 1 messages with the upstream up, in ROUNDS bursts
    # (each round forwarded and retired before the next)
    local rounds=$2 per=$((BURST_UP / FILL_PUBLISHERS / $2))
    local n=$((per * FILL_PUBLISHERS * $2)) before after line case=burst-up
    ((rounds > 1)) && case=bursts-up
    before=$(settled_write_bytes "$GW_PID")
    for r in $(seq 1 "$rounds"); do
        line=$("$MQTT_LOAD" --port "$GW_MQTT" --publishers "$FILL_PUBLISHERS" --messages "$per" \
            --payload "$PAYLOAD" --qos 1 --inflight "$FILL_INFLIGHT" --timeout 900)
        wait_forwarded $((per * FILL_PUBLISHERS * r)) 600
        wait_retired 60
    done
    after=$(settled_write_bytes "$GW_PID")
    # $line is the last round's mqtt-load result; the bytes are all rounds'.
    echo "case=$case gateway=$1 rounds=$rounds total_messages=$n last_round: $line write_bytes=$((after - before)) bytes_per_msg=$(python3 -c "print(f'{($after - $before) / $n:.1f}')") loadavg=$(loadavg)"
}

trickle() { # label: TRICKLE messages at 1/s, upstream up
    local before after line idle0 idle1
    idle0=$(settled_write_bytes "$GW_PID")
    sleep 10
    idle1=$(write_bytes "$GW_PID")
    before=$idle1
    line=$("$MQTT_LOAD" --port "$GW_MQTT" --publishers 1 --messages "$TRICKLE" --rate 1 \
        --payload "$PAYLOAD" --qos 1 --timeout $((TRICKLE + 60)))
    wait_retired 60
    after=$(settled_write_bytes "$GW_PID")
    echo "case=trickle gateway=$1 upstream=up $line idle_write_bytes_10s=$((idle1 - idle0)) write_bytes=$((after - before)) bytes_per_msg=$(python3 -c "print(f'{($after - $before) / $TRICKLE:.1f}')") loadavg=$(loadavg)"
}

start_rabbitmq uplinkfig
amqp-declare-queue -u "$RMQ_URI" -d -q uplink-bulk >/dev/null
amqp-declare-queue -u "$RMQ_URI" -d -q uplink-alarm >/dev/null
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
echo "loadavg_start=$(loadavg) rabbitmq=$RMQ_VERSION commit=$COMMIT payload=$PAYLOAD backlog=$BACKLOG cores=$(nproc)"

# 1. RabbitMQ's own rate.
# rabbitmq_publish CASE WHEN PUBLISHERS [SHAPE]: one timed run (amqp-load
# --shape SHAPE, plain by default), with the CPU RabbitMQ's node used over
# it (% of one core).
rabbitmq_publish() {
    local line cpu0 t0 cpu t
    cpu0=$(cpu_ticks "$(cat "$RMQ_DIR/pid")") t0=$(now)
    line=$("$AMQP_LOAD" --uri "$RMQ_URI" --payload "$PAYLOAD" --queue uplink-rmq --timeout 600 \
        publish --publishers "$3" --window "$WINDOW" --seconds "$RMQ_SECONDS" --shape "${4:-plain}")
    cpu=$(($(cpu_ticks "$(cat "$RMQ_DIR/pid")") - cpu0)) t=$(now)
    echo "case=$1 when=$2 $line rabbitmq_cpu_pct=$(python3 -c "print(f'{100 * $cpu / $(getconf CLK_TCK) / ($t - $t0):.0f}')") loadavg=$(loadavg)" |
        tee -a "$WORK/lines"
    rmqctl purge_queue uplink-rmq >/dev/null
}
rabbitmq_timed() { # when: RabbitMQ's own rate, and with the gateway's messages
    rabbitmq_publish rabbitmq-timed "$1" "$PUBLISHERS"
    if [[ -n $GATEWAY_SHAPE ]]; then
        rabbitmq_publish rabbitmq-shaped "$1" "$PUBLISHERS" "$GATEWAY_SHAPE"
    fi
}
rabbitmq_timed start
if [[ -n $RMQ_ONE ]]; then
    # Context: RabbitMQ with the gateway's shape of link, one connection
    # and one channel (rounds alternating with the 4-publisher figure).
    for round in $(seq 1 "$RMQ_ONE"); do
        rabbitmq_publish rabbitmq-one "round-$round" 1
        rabbitmq_timed "round-$round"
    done
    exit 0
fi
if [[ $RMQ_VOLUME == 1 ]]; then
    line=$("$AMQP_LOAD" --uri "$RMQ_URI" --payload "$PAYLOAD" --queue uplink-rmq --timeout 900 \
        publish --publishers "$PUBLISHERS" --window "$WINDOW" --seconds 900 --count "$BACKLOG")
    echo "case=rabbitmq-backlog $line loadavg=$(loadavg)" | tee -a "$WORK/lines"
    rmqctl purge_queue uplink-rmq >/dev/null
fi

# 2. Backlog drain, per max_in_flight.
N=0
for item in $DRAIN_CASES; do
    W=${item%%:*} P=${item##*:} N=$((N + 1))
    rmqctl purge_queue uplink-bulk >/dev/null
    rmqctl purge_queue uplink-alarm >/dev/null
    rabbitmq_timed "before-drain-$N-$W-$P"
    rmqctl stop_app >/dev/null
    start_gateway "$GATEWAY" "drain-$W-$P" "$RMQ_PORT" "$W" "$P"
    fill "after" | tee -a "$WORK/lines"

    poll=$WORK/poll-$W-$P
    python3 "$WORK/poll.py" "$GW_METRICS" "$poll" "$BACKLOG" "$(python3 -c "print($POLL_MS / 1000)")" 900 &
    poller=$!
    BG_PIDS+=("$poller")
    for _ in $(seq 1 200); do # the poller's first sample (link down) is in
        [[ -s $poll ]] && break
        sleep 0.05
    done
    arrival=$WORK/alarm-arrival-$W-$P
    : >"$arrival"
    io_before=$(write_bytes "$GW_PID")
    opened=$WORK/port-open-$W-$P
    python3 "$WORK/probe.py" "$RMQ_PORT" "$opened" &
    probe=$!
    BG_PIDS+=("$probe")
    t_back0=$(now)
    rmqctl start_app >/dev/null
    t_back=$(now)
    wait "$probe" || true
    # The consumer needs the broker; it is ready long before the alarm.
    amqp-consume -u "$RMQ_URI" -q uplink-alarm -c 1 date +%s.%N >"$arrival" 2>/dev/null &
    consumer=$!
    BG_PIDS+=("$consumer")
    for _ in $(seq 1 600); do
        awk '$2 == 1 {found=1} END {exit !found}' "$poll" 2>/dev/null && break
        sleep 0.05
    done
    # CPU from the link coming up to the last confirm.
    rmq_pid=$(cat "$RMQ_DIR/pid")
    gw_cpu0=$(cpu_ticks "$GW_PID") rmq_cpu0=$(cpu_ticks "$rmq_pid")
    sleep "$ALARM_DELAY"
    t_alarm0=$(now)
    mosquitto_pub -h 127.0.0.1 -p "$GW_MQTT" -q 1 -i "uplink-alarm-$W-$P" -t alarms/site-1 -m alarm
    t_alarm1=$(now)
    if ! timeout 900 tail --pid="$consumer" -f /dev/null; then
        echo "the alarm did not arrive within 900 s" >&2
    fi
    wait "$poller" || true
    io_after=$(write_bytes "$GW_PID")
    gw_cpu=$(($(cpu_ticks "$GW_PID") - gw_cpu0)) rmq_cpu=$(($(cpu_ticks "$rmq_pid") - rmq_cpu0))
    depth=$(rmqctl -q list_queues name messages | awk '$1 == "uplink-bulk" {print $2}')
    # Should be 0: the one alarm was taken by the consumer (a stale or
    # duplicate one would be here, and would have been taken instead).
    alarm_depth=$(rmqctl -q list_queues name messages | awk '$1 == "uplink-alarm" {print $2}')
    alarm_forwarded=$(gateway_metric '^edge_messages_forwarded_total\{.*route="alarm"')
    stop_gateway
    BG_PIDS=()
    rmqctl purge_queue uplink-bulk >/dev/null
    rabbitmq_timed "after-drain-$N-$W-$P"
    python3 - "$poll" "$BACKLOG" "$t_back0" "$t_back" "$t_alarm0" "$t_alarm1" "$(cat "$arrival")" \
        "$W" "$depth" "$((io_after - io_before))" "$(loadavg)" "$(cat "$opened")" "$P" \
        "$gw_cpu" "$rmq_cpu" "$(getconf CLK_TCK)" "$alarm_depth" "$alarm_forwarded" "$N" <<'PY' | tee -a "$WORK/lines"
import sys
poll, backlog, back0, back, alarm0, alarm1, arrival, w, depth, io, load, opened, p = sys.argv[1:14]
gw_cpu, rmq_cpu, hz = (int(x) for x in sys.argv[14:17])
alarm_depth, alarm_forwarded, n = sys.argv[17:20]
backlog = int(backlog)
back0, back, alarm0, alarm1, opened = map(float, (back0, back, alarm0, alarm1, opened))
rows = [l.split() for l in open(poll)]
rows = [(float(t), int(up), int(b), int(a)) for t, up, b, a in rows]
# Each event lies between the last sample before it and the first after it;
# times are taken at the first sample after (so up to POLL_MS late).
link = next(t for t, up, b, a in rows if up == 1)
first = next(t for t, up, b, a in rows if b + a > 0)
last = next(t for t, up, b, a in rows if b >= backlog)
alarm_seen = next((t for t, up, b, a in rows if a > 0), None)
link_down_last = max((t for t, up, b, a in rows if t < link), default=None)
arrival = float(arrival) if arrival.strip() else None
waiting = None
if arrival is not None:
    seen = [b for t, up, b, a in rows if t <= arrival]
    waiting = backlog - (seen[-1] if seen else 0)
ms = lambda x: "none" if x is None else f"{x * 1000:.0f}"
drain = backlog / (last - link)
print(f"case=drain n={n} max_in_flight={w} alarm_priority={p} msgs_per_s={drain:.0f} drain_seconds={last - link:.3f} "
      f"start_app_seconds={back - back0:.3f} port_open_after_start_app_ms={ms(opened - back0)} "
      f"port_open_to_link_ms={ms(link - opened)} port_open_to_first_confirm_ms={ms(first - opened)} "
      f"link_to_first_confirm_ms={ms(first - link)} link_up_window_ms={ms(None if link_down_last is None else link - link_down_last)} "
      f"alarm_publish_to_arrival_ms={ms(None if arrival is None else arrival - alarm0)} "
      f"alarm_puback_ms={ms(alarm1 - alarm0)} "
      f"alarm_publish_to_forwarded_sample_ms={ms(None if alarm_seen is None else alarm_seen - alarm0)} "
      f"alarm_after_link_ms={ms(alarm0 - link)} backlog_waiting_at_alarm={waiting} "
      f"gateway_cpu_pct={100 * gw_cpu / hz / (last - link):.0f} "
      f"rabbitmq_cpu_pct={100 * rmq_cpu / hz / (last - link):.0f} "
      f"queue_depth={depth} alarm_queue_depth_after={alarm_depth} alarm_forwarded={alarm_forwarded} "
      f"drain_write_bytes_per_msg={int(io) / backlog:.1f} loadavg={load}")
PY
done

# 3. Disk per message, a burst with the upstream up, a trickle (and the
# older gateway).
if ((BURST_UP > 0)); then
    cases=1
    ((BURST_ROUNDS > 1 && BURST_UP / FILL_PUBLISHERS / BURST_ROUNDS > 0)) && cases="1 $BURST_ROUNDS"
    for rounds in $cases; do
        rmqctl purge_queue uplink-bulk >/dev/null
        start_gateway "$GATEWAY" burst-up "$RMQ_PORT" 1000
        burst_up "after" "$rounds" | tee -a "$WORK/lines"
        stop_gateway
        rmqctl purge_queue uplink-bulk >/dev/null
    done
    if [[ -n $BEFORE_BIN ]]; then
        for rounds in $cases; do
            start_gateway "$BEFORE_BIN/edge-gateway" before-burst-up "$RMQ_PORT" 1000
            burst_up "before" "$rounds" | tee -a "$WORK/lines"
            stop_gateway
            rmqctl purge_queue uplink-bulk >/dev/null
        done
    fi
fi
if ((TRICKLE > 0)); then
    rmqctl purge_queue uplink-bulk >/dev/null
    start_gateway "$GATEWAY" trickle "$RMQ_PORT" 1000
    trickle "after" | tee -a "$WORK/lines"
    stop_gateway
fi
if [[ -n $BEFORE_BIN ]]; then
    before_port=$(free_port) # nothing listens: the upstream stays down
    start_gateway "$BEFORE_BIN/edge-gateway" before-fill "$before_port" 1000
    fill "before" | tee -a "$WORK/lines"
    stop_gateway
    if ((TRICKLE > 0)); then
        rmqctl purge_queue uplink-bulk >/dev/null
        start_gateway "$BEFORE_BIN/edge-gateway" before-trickle "$RMQ_PORT" 1000
        trickle "before" | tee -a "$WORK/lines"
        stop_gateway
    fi
fi
echo "loadavg_end=$(loadavg)"

python3 - "$WORK/lines" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in open(sys.argv[1])]
get = lambda case, **kw: [r for r in rows if r["case"] == case and all(r.get(k) == v for k, v in kw.items())]
timed = [r for r in rows if r["case"] == "rabbitmq-timed"]
backlog = [float(r["msgs_per_s"]) for r in rows if r["case"] == "rabbitmq-backlog"]
print("== summary")
print(f"rabbitmq publish+confirm, {timed[0]['publishers']} publishers x window {timed[0]['window']}, "
      f"{timed[0]['seconds']} s runs: " + ", ".join(f"{r['when']}={float(r['msgs_per_s']):.0f}" for r in timed)
      + (f" msgs/s; {backlog[0]:.0f} msgs/s for the backlog's volume" if backlog else " msgs/s"))
shaped = [r for r in rows if r["case"] == "rabbitmq-shaped"]
if shaped:
    print(f"rabbitmq with the gateway's messages (--shape {shaped[0]['shape']}): "
          + ", ".join(f"{r['when']}={float(r['msgs_per_s']):.0f}" for r in shaped) + " msgs/s")
adjacent = lambda n, w, p, runs=timed: [float(r["msgs_per_s"]) for r in runs if r["when"].endswith(f"drain-{n}-{w}-{p}")]
def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
for r in get("drain"):
    d = float(r["msgs_per_s"])
    alarm = num(r["alarm_publish_to_arrival_ms"])
    share = "?" if alarm is None else f"{alarm / (float(r['drain_seconds']) * 1000):.4f}"
    near = adjacent(r["n"], r["max_in_flight"], r["alarm_priority"])
    ref = statistics.mean(near)
    same = adjacent(r["n"], r["max_in_flight"], r["alarm_priority"], shaped)
    if same:
        print(f"drain max_in_flight={r['max_in_flight']} alarm_priority={r['alarm_priority']}: "
              f"{d / statistics.mean(same):.2f}x rabbitmq publishing the gateway's messages around it "
              f"(mean of {', '.join(f'{x:.0f}' for x in same)})")
    print(f"drain max_in_flight={r['max_in_flight']} alarm_priority={r['alarm_priority']}: {d:.0f} msgs/s = "
          f"{d / ref:.2f}x rabbitmq's own rate around it (mean of {', '.join(f'{x:.0f}' for x in near)}), "
          + (f"{d / backlog[0]:.2f}x its backlog-volume run; " if backlog else "")
          + f"cpu gateway {r['gateway_cpu_pct']} %, rabbitmq {r['rabbitmq_cpu_pct']} % of one core; "
          f"broker port open -> link up {r['port_open_to_link_ms']} ms, -> first confirm "
          f"{r['port_open_to_first_confirm_ms']} ms (link up -> first confirm {r['link_to_first_confirm_ms']} ms); "
          f"alarm publish -> in its queue {r['alarm_publish_to_arrival_ms']} ms "
          f"(= {share} of the drain time) with {r['backlog_waiting_at_alarm']} backlog messages still waiting")
for case in ("fill", "burst-up", "bursts-up", "trickle"):
    by = {}
    for r in get(case):
        by.setdefault(r["gateway"], []).append(float(r["bytes_per_msg"]))
    med = {k: statistics.median(v) for k, v in by.items()}
    text = ", ".join(f"{k}={med[k]:.0f} B/msg (runs: {', '.join(f'{x:.0f}' for x in v)})" for k, v in by.items())
    if med.get("before") and "after" in med:
        text += f"; after/before={med['after'] / med['before']:.2f}"
    print(f"disk {case}: {text}")
PY
