#!/usr/bin/env bash
# Issue 9's drain gap: what each part of the gateway's publish costs
# RabbitMQ. `amqp-load publish --shape S` against a private RabbitMQ node
# (loopback only, free ports, data under a temporary directory, stopped on
# exit whatever happens; run as root: RabbitMQ drops to the `rabbitmq` user),
# started as benches/uplink-figures.sh starts it.
#
#   benches/publish-shapes.sh
#   ROUNDS=5 SHAPES="plain gateway" benches/publish-shapes.sh
#
# Per round (ROUNDS of them), for each shape of SHAPES in turn (the order
# rotated by one shape each round, so no shape always runs first): one run of
# 1 publisher x WINDOW, PAYLOAD-byte persistent messages, RMQ_SECONDS, into
# the durable queue shapes (purged before and after), then for each shape of
# WIDE_SHAPES one run with WIDE_PUBLISHERS publishers. Each run prints
# amqp-load's line, the CPU RabbitMQ's node used over it (% of one core),
# its CPU per confirmed message (µs) and the load average. The summary gives
# each run's ratio to `plain` with the same publishers in the same round.
set -euo pipefail
export PATH=$PATH:/usr/sbin
source "$(dirname "$0")/lib.sh"

PAYLOAD=${PAYLOAD:-100}
WINDOW=${WINDOW:-1000}
RMQ_SECONDS=${RMQ_SECONDS:-10}
ROUNDS=${ROUNDS:-3}
SHAPES=${SHAPES:-"plain mandatory ids headers gateway"}
WIDE_SHAPES=${WIDE_SHAPES:-"plain gateway"}
WIDE_PUBLISHERS=${WIDE_PUBLISHERS:-4}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
AMQP_LOAD=$BIN/amqp-load
[[ -x $AMQP_LOAD ]] || { echo "no $AMQP_LOAD (cargo build --release -p edge-benches)" >&2; exit 1; }
for t in rabbitmq-server rabbitmqctl python3; do
    command -v "$t" >/dev/null || { echo "$t is needed" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/edge-publish-shapes.XXXXXX)
chmod 755 "$WORK"
RMQ_NODE=""
RMQ_DIR=$WORK/rabbitmq
RMQ_ENV=()

cleanup() {
    stop_rabbitmq
    [[ -n ${KEEP_WORK:-} ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run ROUND SHAPE PUBLISHERS: one timed run with RabbitMQ's CPU over it.
run() {
    local line cpu0 t0 cpu t pid
    pid=$(cat "$RMQ_DIR/pid")
    cpu0=$(cpu_ticks "$pid") t0=$(now)
    line=$("$AMQP_LOAD" --uri "$RMQ_URI" --payload "$PAYLOAD" --queue shapes --timeout 600 \
        publish --shape "$2" --publishers "$3" --window "$WINDOW" --seconds "$RMQ_SECONDS")
    cpu=$(($(cpu_ticks "$pid") - cpu0)) t=$(now)
    local confirmed=${line##*confirmed=}
    confirmed=${confirmed%% *}
    echo "round=$1 $line rabbitmq_cpu_pct=$(python3 -c "print(f'{100 * $cpu / $(getconf CLK_TCK) / ($t - $t0):.0f}')") rabbitmq_cpu_us_per_msg=$(python3 -c "print(f'{1e6 * $cpu / $(getconf CLK_TCK) / max(1, $confirmed):.1f}')") loadavg=$(loadavg)" |
        tee -a "$WORK/lines"
    rmqctl purge_queue shapes >/dev/null
}

start_rabbitmq shapes
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
echo "loadavg_start=$(loadavg) rabbitmq=$RMQ_VERSION commit=$COMMIT payload=$PAYLOAD window=$WINDOW seconds=$RMQ_SECONDS cores=$(nproc)"
# rotated LIST N: the words of LIST, starting at the Nth (from 0, wrapping).
rotated() {
    local -a words
    read -ra words <<<"$1"
    local n=${#words[@]} i
    for ((i = 0; i < n; i++)); do
        echo "${words[$((($2 + i) % n))]}"
    done
}
for round in $(seq 1 "$ROUNDS"); do
    for shape in $(rotated "$SHAPES" $((round - 1))); do
        run "$round" "$shape" 1
    done
    for shape in $(rotated "$WIDE_SHAPES" $((round - 1))); do
        run "$round" "$shape" "$WIDE_PUBLISHERS"
    done
done
echo "loadavg_end=$(loadavg)"

python3 - "$WORK/lines" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in open(sys.argv[1])]
rate = lambda r: float(r["msgs_per_s"])
plain = {(r["round"], r["publishers"]): rate(r) for r in rows if r["shape"] == "plain"}
print("== summary (ratio: to plain with the same publishers in the same round)")
keys = []
for r in rows:
    k = (r["publishers"], r["shape"])
    if k not in keys:
        keys.append(k)
for pubs, shape in keys:
    runs = [r for r in rows if r["publishers"] == pubs and r["shape"] == shape]
    ratios = [rate(r) / plain[(r["round"], pubs)] for r in runs if (r["round"], pubs) in plain]
    print(f"publishers={pubs} shape={shape}: msgs/s {', '.join(f'{rate(r):.0f}' for r in runs)} "
          f"(median {statistics.median(rate(r) for r in runs):.0f}); "
          f"ratio {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}); "
          f"rabbitmq cpu % {', '.join(r['rabbitmq_cpu_pct'] for r in runs)}; "
          f"µs/msg {', '.join(r['rabbitmq_cpu_us_per_msg'] for r in runs)} "
          f"(median {statistics.median(float(r['rabbitmq_cpu_us_per_msg']) for r in runs):.1f})")
PY
