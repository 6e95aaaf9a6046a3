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

# Run everything, keep cargo's output, and close with one total over all test binaries (cargo's
# own last line is the last binary's, often a crate's empty doc tests).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
