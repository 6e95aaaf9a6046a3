#!/usr/bin/env python3
"""What the console asks of the bridge, timed: the device list's first page, a search, a
filter, the fleet overview, and a device page whose device has 1,000 jobs (the newest page of
them, as the console reads it). Each request is made ROUNDS times over one keep-alive
connection on loopback; the time is from sending the request to the last byte of the answer,
so it bounds the bridge's own time from above.

    bench/console.py ADMIN_URL TOKEN_FILE OUT_DIR   (bench/run.sh console runs it)

Before timing it submits JOBS jobs to the first registered device (the fleet has left; they
stay queued). Writes OUT_DIR/console.json and OUT_DIR/console.md.
"""

import http.client
import json
import statistics
import sys
import time
import urllib.parse

ROUNDS = 30
JOBS = 1000
GOAL_MS = 300


def main() -> None:
    admin_url, token_file, out = sys.argv[1:4]
    token = open(token_file, encoding="utf-8").read().strip()
    url = urllib.parse.urlsplit(admin_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method: str, path: str, body=None):
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read()
        if response.status >= 300:
            raise SystemExit(f"{method} {path}: {response.status} {text[:200]!r}")
        return json.loads(text) if text else None

    devices = call("GET", "/v1/devices?limit=1")
    if not devices:
        raise SystemExit("no device registered")
    busy = devices[0]
    for n in range(JOBS):
        call("POST", f"/v1/devices/{busy['device_id']}/jobs", {"payload": f"job {n}"})
    fleet = call("GET", "/v1/fleet")
    serial = busy["serial"]
    dev = f"/v1/devices/{busy['device_id']}"
    requests = [
        ("device list, first page", "/v1/devices?limit=51"),
        ("device list, search by serial", f"/v1/devices?q={urllib.parse.quote(serial)}&limit=51"),
        ("device list, search matching every device", f"/v1/devices?q={urllib.parse.quote(busy['customer'])}&limit=51"),
        ("device list, disabled devices", "/v1/devices?condition=disabled&limit=51"),
        ("fleet overview", "/v1/fleet"),
        ("device page: the device", dev),
        (f"device page: newest 51 of its {JOBS} jobs", f"{dev}/jobs?order=newest&limit=51"),
        ("device page: newest 50 requests", f"{dev}/requests?order=newest&limit=50"),
        ("device page: settings", f"{dev}/settings"),
        ("device page: contracts", f"{dev}/contracts"),
    ]
    rows = []
    for name, path in requests:
        times = []
        size = 0
        for _ in range(ROUNDS):
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            times.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise SystemExit(f"GET {path}: {response.status}")
            size = len(body)
        times.sort()
        rows.append(
            {
                "request": name,
                "path": path,
                "bytes": size,
                "p50_ms": round(statistics.median(times), 2),
                "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
                "max_ms": round(times[-1], 2),
            }
        )
    report = {"devices": fleet["devices"], "jobs_on_one_device": JOBS, "rounds": ROUNDS, "rows": rows}
    with open(f"{out}/console.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    worst = max(r["max_ms"] for r in rows)
    lines = [
        f"{fleet['devices']} registered devices; one of them has {JOBS} jobs; "
        f"{ROUNDS} rounds of each request over one keep-alive connection.",
        "",
        "| request | answer bytes | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['request']} | {r['bytes']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_ms']} |"
        for r in rows
    ]
    verdict = "met" if worst < GOAL_MS else "MISSED"
    lines += ["", f"Slowest answer {worst:.1f} ms: the {GOAL_MS} ms goal is {verdict}."]
    with open(f"{out}/console.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if worst >= GOAL_MS:
        sys.exit(1)


if __name__ == "__main__":
    main()
