#!/usr/bin/env python3
"""Image size and cold start-to-ready time of the iotgw image (the figures in BENCHMARKS.md).

    python3 deploy/sidecar-test/bench.py [--binary target/release/iotgw] [--runs 7]

1. Packages the binary with deploy/build-image.sh --prebuilt twice: on the distroless
   runtime (gcr.io/distroless/cc-debian12:nonroot, what deploy/Dockerfile ships) and on
   debian:bookworm-slim, and prints the image sizes (`docker image inspect .Size`).
2. Cold start-to-ready, per run: a fresh container (new anonymous /data volume, so a new
   SQLite file) is created with the API published on a loopback port; the clock starts
   right before `docker start` and stops at the first 200 from GET /ready, polled every
   5 ms from the host. Two set-ups: the embedded default (in-process broker, simulated
   devices) and the mqtt provider on a Mosquitto container (deploy/compose/gateway.toml).
   "process" is the same end point measured from the container's State.StartedAt, i.e.
   without the time Docker takes to set the container up.

Needs Docker and the images debian:bookworm-slim, eclipse-mosquitto:2 and
gcr.io/distroless/cc-debian12:nonroot (deploy/images/ builds them without a registry).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKEN = "bench-token-0123456789abcdef"


def docker(*args, check=True):
    out = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"docker {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def build(binary, tag, runtime):
    subprocess.run(
        ["bash", os.path.join(ROOT, "deploy/build-image.sh"), "--prebuilt", binary,
         "--tag", tag, "--runtime", runtime],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag))


def started_at(container):
    raw = docker("inspect", "-f", "{{.State.StartedAt}}", container)
    # 2026-11-22T20:49:15.123456789Z -> microseconds are enough
    date, frac = raw.rstrip("Z").split(".")
    ts = datetime.datetime.strptime(date, "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    return ts + float("0." + frac)


def wait_ready(port, deadline_s=30.0):
    end = time.monotonic() + deadline_s
    url = f"http://127.0.0.1:{port}/ready"
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return time.monotonic(), time.time()
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.005)
    sys.exit(f"{url} was not ready within {deadline_s} s")


def one_run(image, port, extra):
    name = f"iotgw-bench-{os.getpid()}-{port}-{time.monotonic_ns()}"
    docker("create", "--name", name, "-p", f"127.0.0.1:{port}:8080",
           "-e", "IOTGW_API__LISTEN=0.0.0.0:8080", "-e", f"IOTGW_API__TOKEN={TOKEN}",
           *extra, image)
    try:
        t0 = time.monotonic()
        docker("start", name)
        t1, wall = wait_ready(port)
        return (t1 - t0) * 1000, (wall - started_at(name)) * 1000
    finally:
        docker("rm", "-f", "-v", name, check=False)


def summary(label, runs):
    total = [r[0] for r in runs]
    proc = [r[1] for r in runs]
    print(f"{label}: docker start -> ready median {statistics.median(total):.0f} ms "
          f"(min {min(total):.0f}, max {max(total):.0f}); process start -> ready median "
          f"{statistics.median(proc):.0f} ms (min {min(proc):.0f}, max {max(proc):.0f}); "
          f"{len(runs)} runs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/iotgw"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--port", type=int, default=18080)
    a = ap.parse_args()

    print(f"binary: {a.binary}: {os.path.getsize(a.binary)} bytes")
    sizes = {}
    for tag, runtime in [("iotgw:bench", "gcr.io/distroless/cc-debian12:nonroot"),
                         ("iotgw:bench-debian", "debian:bookworm-slim")]:
        sizes[tag] = build(a.binary, tag, runtime)
        base = int(docker("image", "inspect", "-f", "{{.Size}}", runtime))
        print(f"image {tag} on {runtime}: {sizes[tag]} bytes ({sizes[tag] / 1e6:.1f} MB; "
              f"runtime base {base / 1e6:.1f} MB)")

    # Warm-up (page cache, image layers), not counted.
    one_run("iotgw:bench", a.port, [])
    summary("embedded default", [one_run("iotgw:bench", a.port, []) for _ in range(a.runs)])

    net = f"iotgw-bench-{os.getpid()}"
    mosq = f"{net}-mosquitto"
    docker("network", "create", net)
    try:
        docker("create", "--name", mosq, "--network", net, "--network-alias", "mosquitto",
               "eclipse-mosquitto:2")
        docker("cp", os.path.join(ROOT, "deploy/compose/mosquitto.conf"),
               f"{mosq}:/mosquitto/config/mosquitto.conf")
        docker("start", mosq)
        end = time.monotonic() + 20
        while subprocess.run(["docker", "exec", mosq, "mosquitto_sub", "-h", "127.0.0.1", "-t",
                              "$SYS/broker/version", "-C", "1", "-W", "2"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > end:
                sys.exit("Mosquitto did not start")
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "iotgw")
            os.mkdir(cfg)
            with open(os.path.join(ROOT, "deploy/compose/gateway.toml"), encoding="utf-8") as f:
                text = f.read()
            with open(os.path.join(cfg, "gateway.toml"), "w", encoding="utf-8") as f:
                f.write(text)
            runs = []
            for i in range(a.runs + 1):
                name = f"{net}-gw-{i}"
                docker("create", "--name", name, "--network", net, "-p",
                       f"127.0.0.1:{a.port}:8080", "-e", "IOTGW_CONFIG=/etc/iotgw/gateway.toml",
                       "-e", "IOTGW_API__LISTEN=0.0.0.0:8080", "-e", f"IOTGW_API__TOKEN={TOKEN}",
                       "-e", "IOTGW_SINKS__APP__SECRET=bench-secret",
                       "-e", f"IOTGW_PROVIDERS__PLANT__CLIENT_ID=bench-{i}",
                       "iotgw:bench")
                try:
                    docker("cp", cfg, f"{name}:/etc/")
                    t0 = time.monotonic()
                    docker("start", name)
                    t1, wall = wait_ready(a.port)
                    if i > 0:  # the first run is the warm-up
                        runs.append(((t1 - t0) * 1000, (wall - started_at(name)) * 1000))
                finally:
                    docker("rm", "-f", "-v", name, check=False)
            summary("mqtt provider on Mosquitto", runs)
    finally:
        docker("rm", "-f", "-v", mosq, check=False)
        docker("network", "rm", net, check=False)
    print(json.dumps({"sizes": sizes}))


if __name__ == "__main__":
    main()
