#!/bin/sh
# Builds the Debian package: target/debian/edge-gateway_<version>-1_<arch>.deb
# (or under $CARGO_TARGET_DIR). Installs cargo-deb first if it is missing.
#
#   scripts/package.sh                 # release build + .deb
#   sudo apt install ./target/debian/edge-gateway_*.deb
#
# Extra arguments go to cargo-deb (e.g. --target aarch64-unknown-linux-gnu
# for a cross build, with that target's linker configured).
set -eu

cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is missing: installing it (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked
fi

cargo deb -p edge-gateway "$@"

target_dir="${CARGO_TARGET_DIR:-target}"
ls -l "$target_dir"/debian/edge-gateway_*.deb
