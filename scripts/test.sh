#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests use when it is missing (Mosquitto for the
# interop test, Chromium and the browser test's npm packages, the Python conformance device's
# packages and schemathesis), so this works on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

updated=""
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$updated" ]; then $sudo apt-get update -qq; updated=1; fi
    $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto for the interop test" >&2
    apt_install mosquitto mosquitto-clients
fi

# The console's browser test (tests/browser/) drives Debian's Chromium with Playwright.
if [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium for the console's browser test" >&2
    apt_install chromium
fi
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/axe-core ]; then
    echo "installing the packages of tests/browser" >&2
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# The Python conformance device and the metrics parser (tests/conformance/) need four packages.
if ! python3 -c 'import msgpack, websockets.sync.client, paho.mqtt.enums, prometheus_client.openmetrics.parser' 2>/dev/null; then
    echo "installing the Python packages of tests/conformance" >&2
    python3 -m pip install --quiet --disable-pip-version-check -r tests/conformance/requirements.txt
fi

# schemathesis runs every check of the OpenAPI document against a live bridge (tests/api/).
if ! python3 -c 'import schemathesis.cli' 2>/dev/null; then
    echo "installing schemathesis for tests/api" >&2
    python3 -m pip install --quiet --disable-pip-version-check -r tests/api/requirements.txt
fi

# Run every test binary even when one fails (--no-fail-fast), keep cargo's output, and close
# with one total over all of them (cargo's own last line is the last binary's, often a crate's
# empty doc tests), naming each binary that failed or ended without a result line (a crash).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '
    function check() { if (current != "" && !had_result) crashed = crashed " " current }
    /^     Running / || /^   Doc-tests / {
        check()
        binaries++
        had_result = 0
        current = $NF
        gsub(/[()]/, "", current); sub(/.*\//, "", current); sub(/-[0-9a-f]+$/, "", current)
    }
    /^test result:/ {
        had_result = 1
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) { f += $i; if ($i > 0) failed = failed " " current }
            if ($(i+1) ~ /^ignored/) ig += $i
        }
    }
    END {
        check()
        printf "%d passed, %d failed, %d ignored, in %d test binaries", p, f, ig, binaries
        if (failed != "") printf "; failed:%s", failed
        if (crashed != "") printf "; ended without a result:%s", crashed
        printf "\n"
    }' "$log"
exit "$status"
