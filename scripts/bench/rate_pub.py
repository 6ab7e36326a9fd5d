#!/usr/bin/env python3
"""The latency stage's publisher: a fixed offered load, QoS 1, `sent_us` stamped at publish.

    rate_pub.py --port P --devices 10 --rate 10000 --duration 10 [--procs 2] [--metrics-url URL]

--procs processes (one paho-mqtt 2.x client each, MQTT 3.1.1, at most --max-inflight
unacknowledged QoS 1 publishes) share the devices and the rate; together they publish
rate x duration messages on devices/<id>/telemetry, paced against the clock: every ~1 ms
each publishes what is due since the start, so a late loop catches up in a burst rather
than lowering the total, and a publisher that cannot keep up shows as an achieved rate
below the offered one. Each client runs without paho's network thread, so publish()
writes to the socket at once (`sent_us` is the time the message left, not the time it
was queued) and loop() between bursts reads the PUBACKs. One such client does about
7,000 QoS 1 publishes/s on one of these cores, hence two by default.

The payloads are those of gen_payloads.py: per device every 10th message above 75;
`message_id` is `<prefix>-<device>-<seq>`, `sent_us` the epoch microseconds just before
the publish call.

Prints one JSON object: the offered rate, messages, alerting messages, how long publishing
took (first to last publish call, over all processes) and the achieved rate, when the
broker had acknowledged all, the largest backlog behind the schedule, and with
--metrics-url iotgw's acked count when publishing ended and when (wall clock, polled every
20 ms for up to --timeout s) it had acked them all. Exit 124 if the broker has not
acknowledged every publish within --timeout seconds of the end.
"""

import argparse
import json
import multiprocessing as mp
import queue
import sys
import time

import paho.mqtt.client as mqtt

from benchlib import Scraper, now
from gen_payloads import device_ids, temperature


class BufferedClient(mqtt.Client):
    """paho reads each packet with two or three recv() calls (command byte, length bytes,
    body): for a stream of 4-byte PUBACKs that is most of the client's time. This reads
    the socket in 64 KiB chunks and hands paho its small reads from memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize):
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(65536)  # BlockingIOError when nothing is waiting
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        chunk = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(chunk)
        return chunk


def publish_share(host, port, devices, rate, total, prefix, max_inflight, timeout, start_at,
                  out):
    """One process: `total` messages at `rate` round-robin over `devices`."""
    topics = [f"devices/{d}/telemetry" for d in devices]
    state = {"acked": 0, "connected": False}

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        state["connected"] = not reason_code.is_failure

    def on_publish(_client, _userdata, _mid, _reason_code, _properties):
        state["acked"] += 1

    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"bench-rate-pub-{prefix}-{devices[0]}",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port, keepalive=30)
    # Without a network thread nothing waits on paho's wake-up socket pair, but publish()
    # still writes a byte to it: a second send() per message. Drop it (paho 2.x internals;
    # the attribute is only used for that wake-up).
    if getattr(client, "_sockpairW", None) is not None:
        client._sockpairW.close()
        client._sockpairW = None
    deadline = time.monotonic() + 10
    while not state["connected"]:
        if time.monotonic() > deadline:
            out.put({"error": "no CONNACK within 10 s"})
            return
        client.loop(timeout=0.05)
    # Start together with the other processes, on the wall clock.
    while now() < start_at:
        client.loop(timeout=min(0.01, max(0.0, start_at - now())))

    seqs = [0] * len(devices)
    alerting = sent = max_backlog = 0
    t0 = time.monotonic()
    first = now()
    while sent < total:
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        max_backlog = max(max_backlog, due - sent)
        while sent < due:
            i = sent % len(devices)
            seqs[i] += 1
            seq = seqs[i]
            if seq % 10 == 0:
                alerting += 1
            payload = (
                f'{{"message_id":"{prefix}-{devices[i]}-{seq:07d}",'
                f'"device_id":"{devices[i]}","seq":{seq},'
                f'"temperature":{temperature(seq)},'
                f'"humidity":{round(30.0 + (seq * 13 % 400) / 10.0, 1)},'
                f'"sent_us":{time.time_ns() // 1000}}}'
            )
            client.publish(topics[i], payload, qos=1)
            sent += 1
            if sent % 50 == 0:
                client.loop(timeout=0)
        client.loop(timeout=0.001)
    last = now()
    out.put({"published": last})
    deadline = time.monotonic() + timeout
    while state["acked"] < total and time.monotonic() < deadline:
        client.loop(timeout=0.01)
    acked_at = now() if state["acked"] >= total else None
    client.disconnect()
    client.loop(timeout=0.1)
    out.put({"messages": total, "alerting": alerting, "first": first, "last": last,
             "acked": state["acked"], "acked_at": acked_at, "max_backlog": max_backlog})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--prefix", default="lat")
    ap.add_argument("--max-inflight", type=int, default=100)
    ap.add_argument("--metrics-url")
    ap.add_argument("--timeout", type=float, default=60,
                    help="seconds after the last publish to wait for the broker's PUBACKs")
    a = ap.parse_args()

    total = int(round(a.rate * a.duration))
    devices = device_ids(a.devices)
    procs = max(1, min(a.procs, len(devices)))
    groups = [devices[i::procs] for i in range(procs)]
    # Messages per process in proportion to its devices, so every device gets the same rate.
    counts = [total * len(g) // len(devices) for g in groups]
    counts[0] += total - sum(counts)
    out = mp.Queue()
    start_at = now() + 0.5
    workers = [
        mp.Process(target=publish_share, daemon=True,
                   args=(a.host, a.port, g, a.rate * len(g) / len(devices), c,
                         a.prefix, a.max_inflight, a.timeout, start_at, out))
        for g, c in zip(groups, counts)
    ]
    for w in workers:
        w.start()
    # Each process reports {"published"} after its last publish call, then its result.
    parts, published, at_end = [], 0, None
    deadline = time.monotonic() + a.duration * 20 + a.timeout + 30
    while len(parts) < len(workers):
        try:
            msg = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            parts.append({"error": "a publisher process gave no result in time"})
            break
        if "published" in msg:
            published += 1
            if published == len(workers) and a.metrics_url:
                try:
                    at_end = int(Scraper(a.metrics_url).acked())
                except OSError:
                    pass
        else:
            parts.append(msg)
    # Then follow iotgw until it has acked them all (the stage's wait-acked checks again).
    all_acked_at = None
    if a.metrics_url and at_end is not None and not any("error" in p for p in parts):
        target = sum(p["messages"] for p in parts)
        scraper, until = Scraper(a.metrics_url), time.monotonic() + a.timeout
        try:
            while time.monotonic() < until:
                if scraper.acked() >= target:
                    all_acked_at = now()
                    break
                time.sleep(0.02)
        except OSError:
            pass
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        json.dump({"error": errors[0], "timeout": False}, sys.stdout)
        sys.stdout.write("\n")
        return 1
    first = min(p["first"] for p in parts)
    last = max(p["last"] for p in parts)
    acked_ats = [p["acked_at"] for p in parts]
    publish_s = last - first
    result = {
        "offered_rate": a.rate,
        "duration_s": a.duration,
        "procs": procs,
        "messages": sum(p["messages"] for p in parts),
        "alerting": sum(p["alerting"] for p in parts),
        "publish_s": publish_s,
        "achieved_rate": total / publish_s if publish_s > 0 else None,
        "broker_acked": sum(p["acked"] for p in parts),
        "broker_acked_s": None if None in acked_ats else max(acked_ats) - first,
        "max_backlog": max(p["max_backlog"] for p in parts),
        "iotgw_acked_at_publish_end": at_end,
        "iotgw_all_acked_at": all_acked_at,
        "t_first": first,
        "t_last": last,
        "timeout": None in acked_ats,
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 124 if result["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
