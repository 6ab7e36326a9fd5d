#!/usr/bin/env python3
"""Prints the final table of scripts/bench-replicas.sh from its results directory.

    replicas_table.py RESULTS_DIR

Reads meta.env (key=value lines written by the script), <stage>.status (ok, timeout,
failed: ...), <stage>.json (scripts/bench/drive.py), <stage>.load (the load average when the
stage started), <stage>.db.json (alerts, distinct tokens and message ids, primaries, dead
letters), <stage>.metrics-<replica>.json (scripts/bench/analyze.py metrics, one per gateway)
<stage>.logerrors (ERROR/WARN lines in the gateways' logs) and <stage>.cpu0.json /
<stage>.cpu1.json (CPU counters before and after the stage's drive.py run) for the stages
ref, sqlite and pg-R. A missing file shows as "-".
"""

import glob
import json
import os
import sys


def load(d, name):
    try:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def text(d, name, default="-"):
    try:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return f.read().strip() or default
    except OSError:
        return default


def meta(d):
    out = {}
    for line in text(d, "meta.env", "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def num(v, digits=0):
    if v is None or v == "":
        return "-"
    return f"{v:,.{digits}f}"


def ratio(x, y):
    if not x or not y:
        return "-"
    return f"{x / y:.2f}"


def rate(d, stage):
    st = text(d, f"{stage}.status", "skipped")
    r = load(d, f"{stage}.json")
    if st == "ok" and r.get("msgs_per_s"):
        return st, r["msgs_per_s"]
    return st, None


def cpu(d, stage):
    """'iotgw / PostgreSQL / Mosquitto CPU seconds, machine busy %' over the stage."""
    a, b = load(d, f"{stage}.cpu0.json"), load(d, f"{stage}.cpu1.json")
    if not a or not b:
        return "-"

    def secs(key, scale):
        if a.get(key) is None or b.get(key) is None:
            return "-"
        return f"{(b[key] - a[key]) / scale:.1f}"

    hz = a.get("hz") or 100
    gw = secs("gw_ticks", hz) if stage != "ref" else "-"
    total = b["total_ticks"] - a["total_ticks"]
    busy = f"{100 * (b['busy_ticks'] - a['busy_ticks']) / total:.0f} %" if total else "-"
    return f"{gw} / {secs('pg_ns', 1e9)} / {secs('mq_ns', 1e9)}, {busy}"


def per_replica(d, stage):
    """[(replica id, analyze.py metrics)] in replica order."""
    out = []
    prefix = os.path.join(d, f"{stage}.metrics-")
    for path in sorted(glob.glob(prefix + "*.json")):
        rid = path[len(prefix):-len(".json")]
        out.append((rid, load(d, os.path.basename(path))))
    return out


def main():
    d = sys.argv[1]
    m = meta(d)
    n = int(m.get("n", 0) or 0)
    hot = int(m.get("alerting", 0) or 0)
    stages = ["ref", "sqlite"] + [f"pg-{r}" for r in m.get("replicas", "").split()]
    _, ref_rate = rate(d, "ref")
    _, sqlite_rate = rate(d, "sqlite")

    lines = []
    say = lines.append
    say("")
    say(f"iotgw scale-out benchmark, side by side — {m.get('date', '?')}")
    say(f"N = {n:,} QoS 1 messages per stage, {m.get('publishers', '?')} publishers "
        f"(one device each, ~{m.get('payload_bytes', '?')} bytes), {hot:,} hot readings "
        f"(one alert each)")
    say("")
    head = ["stage", "msg/s", "÷ broker", "÷ SQLite", "acked (per replica)", "alerts ok",
            "CPU s: iotgw / PostgreSQL / broker, machine busy", "load at start",
            "log ERROR/WARN"]
    rows = []
    notes = []
    for stage in stages:
        st, v = rate(d, stage)
        r = load(d, f"{stage}.json")
        cell = num(v) if v else ("timeout" if st.startswith("timeout") else st)
        if st != "ok":
            notes.append(f"{stage}: {st}")
        reps = per_replica(d, stage)
        if stage == "ref":
            acked = f"received {num(r.get('received'))}" if r.get("received") is not None else "-"
            alerts = "n/a"
            errors = "-"
        else:
            total = sum(x.get("acked", 0) for _, x in reps)
            acked = num(total) if reps else "-"
            if len(reps) > 1:
                acked += " (" + " / ".join(num(x.get("acked")) for _, x in reps) + ")"
            nacked = sum(x.get("nacked", 0) for _, x in reps)
            if nacked:
                notes.append(f"{stage}: {nacked} nacked")
            db = load(d, f"{stage}.db.json")
            if db.get("alerts") is None:
                alerts = "-"
            else:
                ids = db.get("distinct_message_ids", db.get("distinct_tokens"))
                lost, dup = hot - ids, db["alerts"] - ids
                ok = lost == 0 and dup == 0 and not db.get("dead_letters")
                alerts = f"{'yes' if ok else 'NO'}: {db['alerts']:,} of {hot:,}"
                if not ok:
                    alerts += f" (lost {lost}, duplicates {dup}, dead letters {db.get('dead_letters')})"
                if db.get("primary") is not None:
                    notes.append(f"{stage}: {db['primary']} primary alerts, "
                                 f"{db['alerts'] - db['primary']:,} children (debounce)")
            errors = text(d, f"{stage}.logerrors")
        if stage == "ref":
            ratio_ref, ratio_sqlite = "1.00", ratio(v, sqlite_rate)
        else:
            ratio_ref = ratio(v, ref_rate)
            ratio_sqlite = "1.00" if stage == "sqlite" and v else ratio(v, sqlite_rate)
        if r.get("publishers_done_s") is not None and r.get("elapsed_s") is not None:
            notes.append(f"{stage}: publishers done after {r['publishers_done_s']:.2f} s, "
                         f"clock stopped at {r['elapsed_s']:.2f} s")
        name = {"ref": "broker alone (mosquitto_sub)", "sqlite": "iotgw × 1, SQLite"}.get(
            stage, f"iotgw × {stage[3:]}, PostgreSQL")
        rows.append([name, cell, ratio_ref, ratio_sqlite, acked, alerts, cpu(d, stage),
                     text(d, f"{stage}.load"), errors])

    say("| " + " | ".join(head) + " |")
    say("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        say("| " + " | ".join(row) + " |")
    say("")
    say(f"machine: nproc {m.get('nproc', '?')}, load average before {m.get('load_before', '?')}"
        f" → after {m.get('load_after', '?')}")
    stale = " (sources newer than the binary)" if m.get("binary_stale") == "1" else ""
    say(f"iotgw {m.get('commit', '?')}, target/release/iotgw built {m.get('binary_built', '?')}{stale}; "
        f"pool_size {m.get('pool_size', '?')} per replica")
    say(f"{m.get('mosquitto', '?')}; PostgreSQL {m.get('postgres', '?')}")
    say("CPU: seconds used while the stage's publishers ran (iotgw: all replicas; PostgreSQL and "
        "the broker: their containers' cgroups); machine busy: all cores, every process")
    for note in notes:
        say(f"  {note}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
