#!/usr/bin/env python3
"""Runs one throughput stage of scripts/bench-e2e.sh and times it.

Each stage starts one `mosquitto_pub -q 1 -l` per payload file (topic
devices/<file name>/telemetry, the lines of the file are the messages) and stops the clock
when the consumer under test has all N:

  ceiling     a plain `mosquitto_sub -q 1 -C N+1` on devices/+/telemetry (plus one retained
              warm-up message on bench/warmup, which proves the subscription is in place
              before the clock starts): the clock stops when it exits;
  iotgw       the sum of iotgw_events_acked_total on --metrics-url, polled every --poll-ms,
              reaches N (--metrics-url may be given once per replica: the sum over all);
  peer        the naive peer writes --done (its time of the N-th commit) when N are committed;
  wait-acked  no publishing: waits until iotgw_events_acked_total reaches --target.

The clock starts just before the publishers are started. With --watch-pid the stage fails
as soon as that process (iotgw, the naive peer) has exited (repeatable: any of them). Prints one JSON object. Exit 0 on
success, 124 on timeout (the JSON says "timeout": true), 1 on any other failure.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from benchlib import Scraper, die_with_parent, now

children = []


def on_term(signum, _frame):
    raise SystemExit(128 + signum)


def kill_children():
    for p in children:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 3
    for p in children:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, preexec_fn=die_with_parent, **kw)
    children.append(p)
    return p


def start_publishers(a, log):
    pubs = []
    for path in a.files:
        device = os.path.basename(path).rsplit(".", 1)[0]
        with open(path, "rb") as f:
            pubs.append(spawn(
                ["mosquitto_pub", "-h", a.host, "-p", str(a.port), "-q", "1", "-l",
                 "-t", a.topic.format(device=device), "-i", f"bench-pub-{device}"],
                stdin=f, stdout=subprocess.DEVNULL, stderr=log))
    return pubs


class Publishers:
    """Tracks when the last publisher finished (all its QoS 1 PUBACKs received)."""

    def __init__(self, pubs, t0):
        self.pubs, self.t0, self.done_at = pubs, t0, None

    def check(self):
        if self.done_at is not None:
            return
        codes = [p.poll() for p in self.pubs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            raise RuntimeError(f"mosquitto_pub exited with {bad[0]} (see the publishers' log)")
        if all(c == 0 for c in codes):
            self.done_at = now()

    def elapsed(self):
        return None if self.done_at is None else self.done_at - self.t0


def check_alive(a):
    """--watch-pid: fail at once when a consumer under test has exited."""
    for pid in a.watch_pid or []:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        if state in ("Z", "X", "gone"):
            raise RuntimeError(f"the process under test (pid {pid}) has exited")


class Scrapers:
    """The sum of iotgw_events_acked_total over every --metrics-url (one per replica)."""

    def __init__(self, urls):
        if not urls:
            raise RuntimeError("--metrics-url is required in this mode")
        self.scrapers = [Scraper(u) for u in urls]

    def acked(self):
        return sum(s.acked() for s in self.scrapers)


def result(a, mode, t0, t_end, pubs, **extra):
    out = {"mode": mode, "n": a.n, "timeout": t_end is None}
    if t_end is not None:
        out["elapsed_s"] = t_end - t0
        out["msgs_per_s"] = a.n / (t_end - t0) if t_end > t0 else None
    if pubs is not None:
        out["publishers_done_s"] = pubs.elapsed()
    out.update(extra)
    return out


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def ceiling(a, log):
    out_path = a.sub_output
    warm = subprocess.run(
        ["mosquitto_pub", "-h", a.host, "-p", str(a.port), "-q", "1", "-r",
         "-t", "bench/warmup", "-m", "warmup"],
        stdout=subprocess.DEVNULL, stderr=log, timeout=10, check=False)
    if warm.returncode != 0:
        raise RuntimeError("could not publish the warm-up message")
    with open(out_path, "wb") as out:
        sub = spawn(["mosquitto_sub", "-h", a.host, "-p", str(a.port), "-q", "1",
                     "-C", str(a.n + 1), "-i", "bench-ceiling-sub",
                     "-t", a.topic.format(device="+"), "-t", "bench/warmup"],
                    stdout=out, stderr=log)
    deadline = time.monotonic() + 10
    while os.path.getsize(out_path) == 0:
        if sub.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mosquitto_sub did not receive the warm-up message")
        time.sleep(0.005)
    t0 = now()
    pubs = Publishers(start_publishers(a, log), t0)
    deadline = time.monotonic() + a.timeout
    t_end = None
    while True:
        try:
            code = sub.wait(timeout=0.005)
            t_end = now()
            break
        except subprocess.TimeoutExpired:
            pass
        pubs.check()
        if time.monotonic() > deadline:
            break
    if t_end is not None and code != 0:
        raise RuntimeError(f"mosquitto_sub exited with {code}")
    while pubs.done_at is None and t_end is not None and time.monotonic() < deadline:
        pubs.check()
        time.sleep(0.005)
    subprocess.run(["mosquitto_pub", "-h", a.host, "-p", str(a.port), "-r", "-n",
                    "-t", "bench/warmup"], stdout=subprocess.DEVNULL, stderr=log,
                   timeout=10, check=False)
    if sub.poll() is None:
        sub.terminate()
        sub.wait()
    received = max(0, count_lines(out_path) - 1)  # minus the warm-up message
    return result(a, "ceiling", t0, t_end, pubs, received=received)


def iotgw(a, log):
    scraper = Scrapers(a.metrics_url)
    before = scraper.acked()
    if before:
        raise RuntimeError(f"iotgw has already acked {before:.0f} events before publishing")
    t0 = now()
    pubs = Publishers(start_publishers(a, log), t0)
    deadline = time.monotonic() + a.timeout
    t_end, acked, polls = None, 0.0, 0
    while time.monotonic() < deadline:
        pubs.check()
        check_alive(a)
        acked = scraper.acked()
        polls += 1
        if acked >= a.n:
            t_end = now()
            break
        time.sleep(a.poll_ms / 1000)
    while pubs.done_at is None and t_end is not None and time.monotonic() < deadline:
        pubs.check()
        time.sleep(0.005)
    return result(a, "iotgw", t0, t_end, pubs, acked=int(acked), polls=polls)


def peer(a, log):
    if os.path.exists(a.done):
        raise RuntimeError(f"{a.done} exists before publishing")
    t0 = now()
    pubs = Publishers(start_publishers(a, log), t0)
    deadline = time.monotonic() + a.timeout
    done = None
    while time.monotonic() < deadline:
        pubs.check()
        if os.path.exists(a.done):
            with open(a.done, encoding="utf-8") as f:
                done = json.load(f)
            break
        try:
            check_alive(a)
        except RuntimeError:
            if os.path.exists(a.done):  # it wrote the file and exited since the check above
                continue
            raise
        time.sleep(a.poll_ms / 1000)
    t_end = None if done is None else done["t_nth"]
    while pubs.done_at is None and t_end is not None and time.monotonic() < deadline:
        pubs.check()
        time.sleep(0.005)
    return result(a, "peer", t0, t_end, pubs,
                  committed=None if done is None else done["committed"])


def wait_acked(a, _log):
    scraper = Scrapers(a.metrics_url)
    t0 = now()
    deadline = time.monotonic() + a.timeout
    acked = 0.0
    while time.monotonic() < deadline:
        check_alive(a)
        acked = scraper.acked()
        if acked >= a.target:
            t_end = now()
            return {"mode": "wait-acked", "timeout": False, "acked": int(acked),
                    "waited_s": t_end - t0, "t_end": t_end}
        time.sleep(a.poll_ms / 1000)
    return {"mode": "wait-acked", "timeout": True, "acked": int(acked), "waited_s": now() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["ceiling", "iotgw", "peer", "wait-acked"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--files", nargs="*", default=[])
    ap.add_argument("--topic", default="devices/{device}/telemetry")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--poll-ms", type=float, default=20)
    ap.add_argument("--metrics-url", action="append",
                    help="iotgw's /metrics; repeat it per replica to sum over them")
    ap.add_argument("--sub-output", help="ceiling: where mosquitto_sub writes the messages")
    ap.add_argument("--done", help="peer: the file the naive peer writes at N committed")
    ap.add_argument("--target", type=int, help="wait-acked: the acked count to wait for")
    ap.add_argument("--watch-pid", type=int, action="append",
                    help="fail when this process (the consumer) exits; repeatable")
    ap.add_argument("--log", default=os.devnull, help="stderr of the MQTT clients")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    stages = {"ceiling": ceiling, "iotgw": iotgw, "peer": peer, "wait-acked": wait_acked}
    code = 0
    try:
        with open(a.log, "ab") as log:
            out = stages[a.mode](a, log)
        code = 124 if out.get("timeout") else 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        out = {"mode": a.mode, "error": str(e), "timeout": False}
        code = 1
    finally:
        kill_children()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
