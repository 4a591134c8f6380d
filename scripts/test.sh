#!/usr/bin/env bash
# Installs what the test suite needs (on a fresh Debian 12 as root, or with
# sudo), then builds every binary and runs every test of the workspace.
set -euo pipefail

cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "test.sh: need root or sudo to run: $*" >&2
        return 1
    fi
}

# rabbitmq-server lives in /usr/sbin, which a non-root PATH may lack.
have_rabbitmq() {
    command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ]
}

missing=()
have_rabbitmq || missing+=(rabbitmq-server)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
# Debian's own Python (/usr/bin/python3) with paho-mqtt: the tests run it
# by that path, whatever python3 is first on PATH.
/usr/bin/python3 -c 'import paho.mqtt' >/dev/null 2>&1 || missing+=(python3-paho-mqtt)
# amqps:// upstreams without tls_ca_file trust the system's roots
# (rustls-native-certs); the TLS tests load them.
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# pika, the AMQP client most local applications use, against the gateway's
# AMQP listener.
/usr/bin/python3 -c 'import pika' >/dev/null 2>&1 || missing+=(python3-pika)
# rabbitmq-c's command-line clients (amqp-publish, amqp-consume, amqp-get,
# amqp-declare-queue, amqp-delete-queue) against the AMQP listener.
command -v amqp-publish >/dev/null 2>&1 || missing+=(amqp-tools)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

# The tests start private RabbitMQ nodes themselves (the package's own
# service cannot start without an init system, and is not needed).
export PATH="$PATH:/usr/sbin:/sbin"

echo "test.sh: cargo build --workspace --bins"
cargo build --workspace --bins

echo "test.sh: cargo test --workspace"
cargo test --workspace
