#!/usr/bin/env bash
# Runs the whole test suite. Installs Mosquitto first when it is missing (the interop test runs
# the pipeline against it), so this works on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto for the interop test" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

cargo test --locked --workspace "$@"
