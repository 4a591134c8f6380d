# Shell helpers shared by the bench scripts (amqp-figures.sh, compare.sh,
# publish-shapes.sh, uplink-figures.sh): one copy of each, sourced with
#
#   source "$(dirname "$0")/lib.sh"
#
# Sourcing only defines functions; nothing runs and no variable is set. What
# each helper needs and sets:
#
# free_port                  prints a free TCP port on 127.0.0.1 (python3).
# wait_port PORT SECONDS     returns once 127.0.0.1:PORT accepts a connection,
#                            tried every WAIT_PORT_STEP seconds (0.1 unless the
#                            script sets it); fails after SECONDS.
# loadavg                    the 1, 5 and 15 minute load averages, "a,b,c".
# now                        the time, Unix seconds with nanoseconds.
# cpu_ticks PID              CPU time of PID, all threads, in clock ticks
#                            (utime + stime).
# stop_pid PID [TENTHS]      SIGTERM to PID (a child of this shell), then up to
#                            TENTHS (100) x 0.1 s for it to end, then SIGKILL;
#                            reaps it. The caller clears its own PID variable.
# rmqctl ARGS...             rabbitmqctl against the private node (needs
#                            RMQ_ENV, RMQ_NODE), at most 120 s.
# start_rabbitmq PREFIX      a private RabbitMQ node without plugins named
#                            PREFIX-<pid of the script>@localhost (each script
#                            has its own PREFIX), AMQP on 127.0.0.1 only, free
#                            ports, data under RMQ_DIR. Needs WORK and RMQ_DIR
#                            (the script's; RMQ_DIR is chowned to `rabbitmq`
#                            when run as root). Sets RMQ_NODE, RMQ_ENV,
#                            RMQ_PORT, RMQ_URI, RMQ_PID and RMQ_VERSION.
# stop_rabbitmq              stops the node RMQ_NODE names, if any (needs
#                            RMQ_DIR, RMQ_ENV), killing it if `rabbitmqctl
#                            stop` leaves it running; clears RMQ_NODE. Works
#                            for a node started otherwise (compare.sh's, with
#                            the MQTT plugin) that sets the same variables.
#
# Scripts set RMQ_NODE="" and RMQ_ENV=() before their EXIT trap can run.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port seconds
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep "${WAIT_PORT_STEP:-0.1}"
    done
    echo "nothing listens on 127.0.0.1:$1 after $2 s" >&2
    return 1
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' ','; }

now() { date +%s.%N; }

# The fields after "pid (comm) ", so a comm with spaces does not shift them.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

stop_pid() { # pid [tenths of a second to wait]
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 "${2:-100}"); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

rmqctl() { env "${RMQ_ENV[@]}" timeout 120 rabbitmqctl -n "$RMQ_NODE" "$@"; }

start_rabbitmq() { # node name prefix
    mkdir -p "$RMQ_DIR/mnesia" "$RMQ_DIR/log" "$RMQ_DIR/home"
    local dist
    RMQ_PORT=$(free_port) dist=$(free_port)
    echo '[].' >"$RMQ_DIR/enabled_plugins"
    echo "listeners.tcp.1 = 127.0.0.1:$RMQ_PORT" >"$RMQ_DIR/rabbitmq.conf"
    if [[ $(id -u) -eq 0 ]]; then
        chown -R rabbitmq:rabbitmq "$RMQ_DIR"
    fi
    RMQ_NODE="$1-$$@localhost"
    RMQ_ENV=(
        RABBITMQ_NODENAME="$RMQ_NODE"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$RMQ_PORT"
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
    rmqctl wait "$RMQ_DIR/pid" --timeout 60 >/dev/null
    wait_port "$RMQ_PORT" 30
    RMQ_URI="amqp://guest:guest@127.0.0.1:$RMQ_PORT/%2f"
    RMQ_PID=$(cat "$RMQ_DIR/pid")
    RMQ_VERSION=$(rmqctl -q version 2>/dev/null || echo "?")
}

stop_rabbitmq() {
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
