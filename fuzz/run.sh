#!/usr/bin/env bash
# Runs the fuzz targets with libFuzzer (cargo fuzz), each for RUNS executions (default
# 10,000,000), on a working copy of the committed corpus, and prints a table of executions,
# coverage and the outcome. Names on the command line pick targets; JOBS runs that many at once.
#
#   cargo install cargo-fuzz        # once
#   fuzz/run.sh                     # every target, 10 M executions each
#   RUNS=20000 fuzz/run.sh mqtt_packet hint   # a smoke run of two targets
#   RUNS_admin_request=1000000 fuzz/run.sh    # fewer runs for one slow target
#   SANITIZER_admin_request=none fuzz/run.sh admin_request   # without AddressSanitizer (all
#                                   # safe Rust at the top; ASan makes this target 40x slower)
#
# cargo fuzz needs nightly flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Inputs that make a target fail are left in fuzz/artifacts/<target>/:
# keep the fixed ones in fuzz/corpus/<target>/ so that the test suite replays them.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
RUNS=${RUNS:-10000000}
JOBS=${JOBS:-1}
WORK=${WORK:-$(mktemp -d)}
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

cargo fuzz build -O
for t in "${targets[@]}"; do
    san_var="SANITIZER_$t"
    if [ -n "${!san_var:-}" ]; then
        cargo fuzz build -O -s "${!san_var}" --target-dir "target/sanitizer-${!san_var}" "$t"
    fi
done

run_one() {
    local t=$1
    mkdir -p "$WORK/$t"
    cp corpus/"$t"/* "$WORK/$t/" 2>/dev/null || true
    local started=$SECONDS status=ok runs_var="RUNS_$t" san_var="SANITIZER_$t"
    local runs=${!runs_var:-$RUNS} san=()
    if [ -n "${!san_var:-}" ]; then
        san=(-s "${!san_var}" --target-dir "target/sanitizer-${!san_var}")
    fi
    cargo fuzz run -O "${san[@]}" "$t" "$WORK/$t" -- -runs="$runs" -max_len=8192 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$WORK/$t.log" 2>&1 || status=FAILED
    local execs cov
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$WORK/$t.log" | grep -oE '[0-9]+$' || echo "?")
    cov=$(grep -oE 'cov: [0-9]+' "$WORK/$t.log" | tail -1 | grep -oE '[0-9]+' || echo "?")
    printf '| %s | %s | %s | %s s | %s |\n' "$t" "$execs" "$cov" "$((SECONDS - started))" "$status"
}

echo "| target | executions | coverage (edges) | time | outcome |"
echo "|---|---|---|---|---|"
active=0
for t in "${targets[@]}"; do
    run_one "$t" &
    active=$((active + 1))
    if [ "$active" -ge "$JOBS" ]; then wait -n; active=$((active - 1)); fi
done
wait
echo "logs and working corpora: $WORK"
