#!/usr/bin/env python3
"""Writes the telemetry the throughput stages publish: one file per device, one JSON
message per line (what `mosquitto_pub -l` reads).

    gen_payloads.py --n 50000 --devices 10 --out DIR [--prefix t]

N is split over the devices as evenly as possible (the first N % devices get one more).
Per device, every 10th message (seq 10, 20, ...) has a temperature above 75 (the
benchmark rule fires on it), every other one below 75. Each message carries a unique
`message_id` (`<prefix>-<device>-<seq>`, unique across devices too) and `sent_us`, the
time of writing in epoch microseconds: the throughput stages do not use it (the
latency stage stamps its own at publish time). The files are generated once and
published byte for byte the same in each throughput stage.

Prints a JSON summary: {"n", "devices", "alerting", "files": [...], "bytes"}.
"""

import argparse
import json
import os
import sys
import time


def device_ids(count):
    width = max(2, len(str(count)))
    return [f"dev-{i:0{width}d}" for i in range(1, count + 1)]


def shares(n, parts):
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def temperature(seq):
    """Above 75 on every 10th message of a device, below 75 otherwise."""
    if seq % 10 == 0:
        return round(76.0 + (seq // 10 % 20) * 0.5, 1)  # 76.0 .. 85.5
    return round(20.0 + (seq * 7 % 500) / 10.0, 1)  # 20.0 .. 69.9


def message(prefix, device, seq, sent_us):
    return {
        "message_id": f"{prefix}-{device}-{seq:07d}",
        "device_id": device,
        "seq": seq,
        "temperature": temperature(seq),
        "humidity": round(30.0 + (seq * 13 % 400) / 10.0, 1),
        "sent_us": sent_us,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default="t")
    a = ap.parse_args()
    if a.n < 1 or a.devices < 1:
        sys.exit("gen_payloads: --n and --devices must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    files, alerting, total_bytes = [], 0, 0
    for device, count in zip(device_ids(a.devices), shares(a.n, a.devices)):
        path = os.path.join(a.out, f"{device}.jsonl")
        with open(path, "w", encoding="ascii") as f:
            for seq in range(1, count + 1):
                line = json.dumps(
                    message(a.prefix, device, seq, time.time_ns() // 1000),
                    separators=(",", ":"),
                )
                f.write(line + "\n")
                total_bytes += len(line)
        alerting += count // 10
        files.append(path)
    json.dump(
        {"n": a.n, "devices": a.devices, "alerting": alerting, "files": files,
         "bytes": total_bytes},
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
