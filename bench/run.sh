#!/usr/bin/env bash
# The benchmark scenarios, one command each and one for all:
#
#   bench/run.sh scale | throughput | poll | brokers | memory | faults | all   (summary: rewrite latest.md)
#   bench/run.sh soak   (not part of `all`: 11 minutes, or SOAK_MINUTES=60 for the long one)
#   bench/run.sh storm  (8,000 devices, the bridge killed and restarted under them)
#   bench/run.sh console  (the console's requests timed at 10,000 registered devices)
#
# Each scenario starts its own release-built cloud bridge (and Mosquitto where needed) on free
# loopback ports, drives it with `device-sim fleet` in a separate process, and writes one report
# per run to bench/results/<scenario>/<run>.{json,md,svg}. `all` also writes
# bench/results/latest.md: the machine, the commit, and every table.
#
# Scale, throughput and brokers measure the steady state: each run first gives every device one
# job that is not counted (--warmup), since a device's first job also pays for the broker's
# first publish to its topic and the agent's first data channel. Poll and faults start measuring
# at once.
#
# QUICK=1 shrinks fleets and durations for a smoke run of the script itself; RATES="1000 2000"
# picks the rates of the throughput scenario. BRIDGE and SIM name
# other builds of cloud-bridge and device-sim (to compare two commits side by side); without
# them the script builds and uses this checkout's. BRIDGE_CONFIG adds lines to the benchmark
# bridges' configuration, e.g. BRIDGE_CONFIG='[store]\nshards = 1\n'.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
OUT=${OUT:-bench/results}
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }

# A process may hold at most 20,000 descriptors here; take them all.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -z "${BRIDGE:-}" ] || [ -z "${SIM:-}" ]; then
    cargo build --release --locked -q -p cloud-bridge -p device-sim
fi
BRIDGE=${BRIDGE:-target/release/cloud-bridge}
SIM=${SIM:-target/release/device-sim}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_bridge NAME [extra serve flags]: sets BRIDGE_PID, DIR, ADMIN_PORT, DATA_PORT, MQTT_ADDR.
start_bridge() {
    DIR=$WORK/$1
    shift
    mkdir -p "$DIR"
    ADMIN_PORT=$(free_port)
    DATA_PORT=$(free_port)
    local mqtt_port
    mqtt_port=$(free_port)
    # The listeners' connection caps share the process's 20,000 descriptors: room for
    # MQTT_CAP devices on MQTT (default 10,000), 1,024 admin connections (the fleet keeps up to
    # 256 submissions in flight per process; at a cap that low the bridge closes idle pooled
    # connections the fleet is about to reuse) and the rest for data channels.
    local mqtt_cap=${MQTT_CAP:-10000}
    local admin_cap=1024
    local data_cap=$((19000 - mqtt_cap - admin_cap))
    if [ "$data_cap" -gt 8000 ]; then data_cap=8000; fi
    printf '[broker]\nmax_connections = %d\n[data_channel]\nmax_connections = %d\n[admin]\nmax_connections = %d\n' \
        "$mqtt_cap" "$data_cap" "$admin_cap" > "$DIR/bridge.toml"
    printf '%b' "${BRIDGE_CONFIG:-}" >> "$DIR/bridge.toml"
    BRIDGE_ARGS=(serve --config "$DIR/bridge.toml" --data-dir "$DIR/data" --admin-listen "127.0.0.1:$ADMIN_PORT"
        --data-listen "127.0.0.1:$DATA_PORT" --mqtt-listen "127.0.0.1:$mqtt_port" "$@")
    launch_bridge
}

launch_bridge() {
    : > "$DIR/ready"
    "$BRIDGE" "${BRIDGE_ARGS[@]}" > "$DIR/ready" 2>> "$DIR/bridge.log" &
    BRIDGE_PID=$!
    PIDS+=("$BRIDGE_PID")
    for _ in $(seq 300); do
        if grep -q '"ready"' "$DIR/ready"; then
            MQTT_ADDR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"])' "$DIR/ready")
            return 0
        fi
        kill -0 "$BRIDGE_PID" 2>/dev/null || { cat "$DIR/bridge.log" >&2; return 1; }
        sleep 0.1
    done
    echo "cloud-bridge did not become ready" >&2
    return 1
}

stop_bridge() {
    kill -TERM "$BRIDGE_PID" 2>/dev/null || true
    wait "$BRIDGE_PID" 2>/dev/null || true
}

# start_mosquitto: a Mosquitto 2 on a free loopback port; sets MOSQ_PID and MOSQ_PORT.
start_mosquitto() {
    MOSQ_PORT=$(free_port)
    local conf=$WORK/mosquitto-$MOSQ_PORT.conf
    # Anonymous on loopback, for the benchmark only: authentication is not what is compared.
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_type error\n' "$MOSQ_PORT" > "$conf"
    local mosquitto=mosquitto
    command -v mosquitto >/dev/null || mosquitto=/usr/sbin/mosquitto
    "$mosquitto" -c "$conf" 2>> "$WORK/mosquitto.log" &
    MOSQ_PID=$!
    PIDS+=("$MOSQ_PID")
}

FAILED=()

# fleet SCENARIO LABEL [fleet flags]. A run that loses or repeats jobs (or cannot run) is
# recorded and the scenarios go on; the script fails at the end.
fleet() {
    local scenario=$1 label=$2
    shift 2
    if ! "$SIM" fleet --label "$label" --out "$OUT/$scenario" \
        --admin-url "http://127.0.0.1:$ADMIN_PORT" --admin-token-file "$DIR/data/admin-token" \
        --data-url "ws://127.0.0.1:$DATA_PORT" --mqtt "$MQTT_ADDR" --bridge-pid "$BRIDGE_PID" \
        --connect-rate 1000 "$@"; then
        FAILED+=("$scenario/$label")
    fi
}

p99_complete() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["submit_to_complete"]["p99_ms"])' "$1"; }

scenario_scale() {
    echo "== scale: latency and memory per device as the fleet grows" >&2
    # One simulator process per 8,000 devices: a process may hold 20,000 descriptors.
    for n in ${SCALE_SIZES:-$(q "1000 5000 10000 15000" "100 300")}; do
        MQTT_CAP=$((n > 9500 ? n + 500 : 10000)) start_bridge "scale-$n"
        fleet scale "scale-$n" --devices "$n" --rate "$(q 1000 100)" --duration "$(q 60s 10s)" \
            --processes $(((n + 7999) / 8000)) --warmup
        stop_bridge
    done
}

scenario_throughput() {
    echo "== throughput: highest rate with p99 submission→completion under 100 ms, 1,000 devices" >&2
    start_bridge throughput
    for rate in ${RATES:-$(q "250 500 750 1000 1250 1500 2000 3000 5000" "50 100 200")}; do
        fleet throughput "rate-$rate" --devices "$(q 1000 100)" --rate "$rate" --duration "$(q 20s 5s)" \
            --warmup
        [ -f "$OUT/throughput/rate-$rate.json" ] || break
        p99=$(p99_complete "$OUT/throughput/rate-$rate.json")
        echo "rate $rate: p99 $p99 ms" >&2
        if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 100 else 1)' "$p99"; then
            break
        fi
    done
    stop_bridge
}

scenario_poll() {
    echo "== push against polling: same fleet and job stream" >&2
    local devices rate duration
    devices=$(q 1000 100)
    rate=$(q 20 10)
    duration=$(q 120s 15s)
    start_bridge poll
    fleet poll push --devices "$devices" --rate "$rate" --duration "$duration"
    fleet poll poll-30s --devices "$devices" --rate "$rate" --duration "$duration" --poll-only 30s
    fleet poll poll-5s --devices "$devices" --rate "$rate" --duration "$duration" --poll-only 5s
    stop_bridge
}

scenario_brokers() {
    echo "== brokers side by side: embedded rumqttd against Mosquitto" >&2
    local devices rate duration
    devices=$(q 1000 100)
    rate=$(q 300 50)
    duration=$(q 30s 10s)
    start_bridge brokers-embedded
    fleet brokers embedded --devices "$devices" --rate "$rate" --duration "$duration" --warmup
    stop_bridge

    start_mosquitto
    start_bridge brokers-mosquitto --broker external --mqtt-url "mqtt://127.0.0.1:$MOSQ_PORT"
    fleet brokers mosquitto --devices "$devices" --rate "$rate" --duration "$duration" --warmup \
        --watch-pid "mosquitto=$MOSQ_PID"
    stop_bridge
    kill -TERM "$MOSQ_PID"
}

scenario_memory() {
    echo "== memory per connected device: idle fleets of two sizes, with each broker" >&2
    local small big duration n
    small=$(q 1000 100)
    big=$(q 5000 300)
    duration=$(q 15s 5s)
    for n in "$small" "$big"; do
        start_bridge "memory-embedded-$n"
        fleet memory "embedded-$n" --devices "$n" --rate 0.1 --duration "$duration"
        stop_bridge
        start_mosquitto
        start_bridge "memory-mosquitto-$n" --broker external --mqtt-url "mqtt://127.0.0.1:$MOSQ_PORT"
        fleet memory "mosquitto-$n" --devices "$n" --rate 0.1 --duration "$duration" \
            --watch-pid "mosquitto=$MOSQ_PID"
        stop_bridge
        kill -TERM "$MOSQ_PID"
    done
    # What one more connected device costs the server: the difference between the two fleets'
    # peak RSS (bridge, plus Mosquitto where it is the broker) over the difference in devices.
    python3 - "$OUT/memory" "$small" "$big" > "$OUT/memory/memory.md" <<'PY'
import json, sys
out, small, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def server_mb(label):
    r = json.load(open(f"{out}/{label}.json"))
    procs = [p for p in r["processes"] if p["name"] != "device-sim fleet"]
    return sum(p["peak_rss_mb"] for p in procs), r["devices_connected"]
print("### memory per connected device (idle fleets)\n")
print(f"| broker | server peak RSS at {small:,} devices | at {big:,} devices | per added device |")
print("|---|---|---|---|")
for broker in ("embedded", "mosquitto"):
    (a, na), (b, nb) = server_mb(f"{broker}-{small}"), server_mb(f"{broker}-{big}")
    print(f"| {broker} | {a:.0f} MB | {b:.0f} MB | {(b - a) * 1000 / (nb - na):.1f} KB |")
PY
}

scenario_faults() {
    echo "== faults: 10 % of MQTT links cut for a minute, and a cloud-bridge restart, under load" >&2
    start_bridge faults
    fleet faults cut-mqtt --devices "$(q 1000 100)" --rate "$(q 200 50)" --duration "$(q 90s 15s)" \
        --cut-mqtt 0.1 --cut-at "$(q 10s 3s)" --cut-for "$(q 60s 5s)"
    # The bridge is killed (SIGKILL) mid-run and started again on the same data and ports.
    fleet faults bridge-restart --devices "$(q 1000 100)" --rate "$(q 200 50)" --duration "$(q 60s 15s)" &
    local fpid=$!
    sleep "$(q 25 8)"
    kill -9 "$BRIDGE_PID"
    wait "$BRIDGE_PID" 2>/dev/null || true
    launch_bridge
    wait "$fpid"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(r["jobs_lost"] + r["jobs_duplicated"] > 0)' \
        "$OUT/faults/bridge-restart.json" || FAILED+=("faults/bridge-restart")
    stop_bridge
}

# The soak: a long steady run, sampling the bridge's RSS and the data directory's size every
# 10 s. Growth is measured from the end of the warm-up minute; with a short retention the data
# directory must level off. SOAK_MINUTES (default 10; 60 for the long version) after the
# warm-up, SOAK_RETENTION_SECS (default 60) as `retention.finished_jobs_secs`.
scenario_soak() {
    # Retention 30 s: the store reaches its steady size (30 s of finished jobs, swept every 5 s)
    # within the 1-minute warm-up, so what the 10 minutes after it measure is growth, not the
    # store and its cache still filling (with 60 s they fill until about 2 minutes in).
    local minutes=${SOAK_MINUTES:-$(q 10 1)} keep=${SOAK_RETENTION_SECS:-$(q 30 10)}
    local rate devices
    rate=$(q 300 100)
    devices=$(q 1000 100)
    echo "== soak: $devices devices at $rate jobs/s for 1 + $minutes min, retention $keep s" >&2
    # Archived, so that the fleet can check the jobs swept before it reads them.
    BRIDGE_CONFIG="${BRIDGE_CONFIG:-}[retention]\nfinished_jobs_secs = $keep\nsweep_interval_ms = 5000\narchive = '$WORK/archive.jsonl'\n" \
        start_bridge soak
    mkdir -p "$OUT/soak"
    local samples=$OUT/soak/samples.csv
    echo "secs,rss_kb,data_bytes" > "$samples"
    (
        local t0=$SECONDS
        while kill -0 "$BRIDGE_PID" 2>/dev/null; do
            echo "$((SECONDS - t0)),$(ps -o rss= -p "$BRIDGE_PID" | tr -d ' '),$(du -sb "$DIR/data" | cut -f1)" >> "$samples"
            sleep 10
        done
    ) &
    local sampler=$!
    fleet soak "soak-${minutes}min" --devices "$devices" --rate "$rate" --duration "$((minutes + 1))m" \
        --archive "$WORK/archive.jsonl"
    curl -s -H "Authorization: Bearer $(cat "$DIR/data/admin-token")" \
        "http://127.0.0.1:$ADMIN_PORT/v1/metrics" > "$OUT/soak/metrics.json"
    stop_bridge
    kill "$sampler" 2>/dev/null || true
    python3 - "$samples" "$OUT/soak/soak-${minutes}min.json" "$OUT/soak/metrics.json" "$keep" "$minutes" \
        > "$OUT/soak/soak.md" <<'PY'
import csv, json, sys
samples, report, metrics, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [(int(r["secs"]), int(r["rss_kb"]), int(r["data_bytes"])) for r in csv.DictReader(open(samples))]
# While the fleet ran (after it, its devices disconnect and the bridge's memory drops).
run_secs = 60 * (1 + int(sys.argv[5]))
rows = [row for row in rows if row[0] <= run_secs]
r = json.load(open(report))
m = json.load(open(metrics))
warm = next(row for row in rows if row[0] >= 60)
rate = r["jobs_submitted"] / max(1, r["duration_secs"])
# The 10-minute mark after the warm-up, and the end (when the run is longer).
marks = [row for row in rows if row[0] >= warm[0] + 600][:1]
if not marks or rows[-1][0] > marks[0][0] + 60:
    marks.append(rows[-1])
print(f"### soak: {r['devices_connected']:,} devices, {rate:.0f} jobs/s, retention {keep} s\n")
print("| from the end of the 1-minute warm-up to | jobs | bridge RSS | growth per 1,000 jobs "
      "| data directory | its largest since the warm-up |")
print("|---|---|---|---|---|---|")
for end in marks:
    jobs = rate * (end[0] - warm[0])
    per_1000 = (end[1] - warm[1]) / max(1, jobs / 1000)
    since = [x[2] for x in rows if warm[0] <= x[0] <= end[0]]
    print(f"| {(end[0] - warm[0]) / 60:.0f} min later | {jobs:,.0f} | {warm[1] / 1000:.1f} → "
          f"{end[1] / 1000:.1f} MB | {per_1000:.1f} KB | {warm[2] / 1e6:.1f} → {end[2] / 1e6:.1f} MB "
          f"| {max(since) / 1e6:.1f} MB |")
print()
print(f"{r['jobs_completed']:,} of {r['jobs_submitted']:,} jobs completed "
      f"({r['jobs_lost']} lost, {r['jobs_duplicated']} run twice); "
      f"{m['jobs_swept']:,} finished jobs swept, {m['sweep_failures']} sweeps failed; "
      f"{len(rows)} samples, every 10 s ({samples.split('/')[-1]}).")
PY
    cat "$OUT/soak/soak.md" >&2
}

# The reconnect storm: a fleet of 8,000 devices connected, the bridge killed (-9) and started
# again; every device must be back within 20 s of the bridge being ready, few may be announced
# offline (the bridge and its embedded broker die together, so every offline published is a
# spurious one: a device seen twice), and every device must complete a job afterwards.
scenario_storm() {
    local devices=${STORM_DEVICES:-$(q 8000 300)}
    echo "== storm: $devices devices, the bridge killed and restarted" >&2
    MQTT_CAP=$((devices > 9500 ? devices + 500 : 10000)) start_bridge storm
    mkdir -p "$OUT/storm"
    local log=$OUT/storm/fleet.log
    : > "$log"
    fleet storm "storm-$devices" --devices "$devices" --rate "$(q 20 10)" --duration "$(q 150s 40s)" \
        --final-round --processes $(((devices + 7999) / 8000)) 2> >(tee "$log" >&2) &
    local fpid=$!
    # Once the whole fleet is connected (registering 8,000 devices takes about a minute), a
    # little steady state.
    until grep -q "fleet connected" "$log"; do
        kill -0 "$fpid" 2>/dev/null || break
        sleep 1
    done
    sleep "$(q 15 5)"
    kill -9 "$BRIDGE_PID"
    wait "$BRIDGE_PID" 2>/dev/null || true
    local killed_ms
    killed_ms=$(date +%s%3N)
    launch_bridge
    local ready_ms
    ready_ms=$(date +%s%3N)
    wait "$fpid" || FAILED+=("storm/storm-$devices")
    curl -s -H "Authorization: Bearer $(cat "$DIR/data/admin-token")" \
        "http://127.0.0.1:$ADMIN_PORT/v1/metrics" > "$OUT/storm/metrics.json"
    stop_bridge
    python3 - "$OUT/storm/storm-$devices.json" "$OUT/storm/metrics.json" "$killed_ms" "$ready_ms" \
        > "$OUT/storm/storm.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); m = json.load(open(sys.argv[2]))
killed, ready = int(sys.argv[3]), int(sys.argv[4])
c = r["mqtt"]
back = c["last_reconnect_unix_ms"]
n = r["devices_connected"]
print(f"### reconnect storm: {n:,} devices, the bridge killed (-9) and restarted\n")
print("| bridge down (kill → ready) | last device back after ready | devices reconnected | "
      "reconnected more than once | most reconnects of one device | offline published "
      "(withdrawn within the grace) | final round: every device's job done in |")
print("|---|---|---|---|---|---|---|")
final = r.get("final_round_secs")
print(f"| {(ready - killed) / 1000:.1f} s | "
      f"{'—' if back is None else f'{(back - ready) / 1000:.1f} s'} | {c['reconnects']:,} | "
      f"{c['devices_reconnected_twice']:,} | {c['most_reconnects_of_one_device']} | "
      f"{m['mqtt_offline_published']:,} ({m['mqtt_offline_withdrawn']:,}) | "
      f"{'—' if final is None else f'{final:.1f} s'} |")
print()
print(f"{r['jobs_completed']:,} of {r['jobs_submitted']:,} jobs completed ({r['jobs_lost']} lost, "
      f"{r['jobs_duplicated']} run twice, {r['jobs_refused']} refused while the bridge was down); "
      f"the bridge's counters are since its restart.")
PY
    cat "$OUT/storm/storm.md" >&2
}

summary() {
    local file=$OUT/latest.md
    {
        echo "# Benchmark run"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
        echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
        if [ "$QUICK" = 1 ]; then echo "- command: QUICK=1 bench/run.sh all"; else echo "- command: bench/run.sh all"; fi
        for scenario in scale throughput poll brokers memory faults; do
            [ -d "$OUT/$scenario" ] || continue
            echo
            echo "## $scenario"
            # In the order they ran.
            for md in $(ls -tr "$OUT/$scenario"/*.md); do
                echo
                sed 's/^### /#### /' "$md"
            done
        done
    } > "$file"
    echo "summary: $file" >&2
}

scenario_console() {
    echo "== console: what its screens ask of the bridge, at 10,000 registered devices" >&2
    local n
    n=$(q 10000 300)
    MQTT_CAP=$((n > 9500 ? n + 500 : 10000)) start_bridge console
    # The fleet registers, runs a few jobs and leaves: its devices stay registered, offline.
    fleet console "register-$n" --devices "$n" --rate "$(q 20 5)" --duration 5s \
        --processes $(((n + 7999) / 8000))
    mkdir -p "$OUT/console"
    python3 bench/console.py "http://127.0.0.1:$ADMIN_PORT" "$DIR/data/admin-token" "$OUT/console" \
        || FAILED+=("console/answers")
    stop_bridge
}

case "${1:-all}" in
    console) scenario_console ;;
    scale) scenario_scale ;;
    throughput) scenario_throughput ;;
    poll) scenario_poll ;;
    brokers) scenario_brokers ;;
    memory) scenario_memory ;;
    faults) scenario_faults ;;
    soak) scenario_soak ;;
    storm) scenario_storm ;;
    summary) summary ;;
    all)
        rm -rf "${OUT:?}"/{scale,throughput,poll,brokers,memory,faults}
        scenario_scale
        scenario_throughput
        scenario_poll
        scenario_brokers
        scenario_memory
        scenario_faults
        summary
        ;;
    *)
        echo "usage: bench/run.sh scale|throughput|poll|brokers|memory|faults|soak|storm|console|all|summary" >&2
        exit 2
        ;;
esac

if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "runs that lost or repeated jobs, or did not run: ${FAILED[*]}" >&2
    exit 1
fi
