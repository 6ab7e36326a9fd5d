#!/usr/bin/env python3
"""Prints the final table of scripts/bench-e2e.sh from its results directory.

    table.py RESULTS_DIR

Reads meta.env (key=value lines written by the script), <stage>.status (ok, timeout,
failed: ..., skipped) and the JSON files of the stages: a.json; b.json, b.metrics.json,
b.db.json; c.json, c.db.json; d0.pub.json, d0.json (the reference), d.pub.json, d.wait.json, d.metrics.json,
d.db.json.
A missing file shows as "-".
"""

import json
import os
import sys


def load(d, name):
    try:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def status(d, stage):
    try:
        with open(os.path.join(d, f"{stage}.status"), encoding="utf-8") as f:
            return f.read().strip() or "failed"
    except OSError:
        return "skipped"


def meta(d):
    out = {}
    try:
        with open(os.path.join(d, "meta.env"), encoding="utf-8") as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    out[k] = v
    except OSError:
        pass
    return out


def num(v, digits=0):
    if v is None or v == "":
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.{digits}f}"


def rate_cell(st, r):
    if st == "ok" and r.get("msgs_per_s"):
        return num(r["msgs_per_s"])
    if st.startswith("timeout"):
        return "timeout"
    if st == "skipped":
        return "skipped"
    return "failed"


def ratio(x, y):
    if not x or not y:
        return "-"
    return f"{x / y:.3f}"


def main():
    d = sys.argv[1]
    m = meta(d)
    n = int(m.get("n", 0))
    alerting = int(m.get("alerting", 0))
    lines = []
    say = lines.append

    say("")
    say(f"iotgw end-to-end benchmark, side by side — {m.get('date', '?')}")
    say(f"  N = {n:,} QoS 1 messages ({alerting:,} above 75, i.e. every 10th per device), "
        f"{m.get('publishers', '?')} publishers (mosquitto_pub -q 1 -l), "
        f"{m.get('devices', '?')} devices, payload ~{m.get('payload_bytes', '?')} B")
    say(f"  iotgw {m.get('commit', '?')} (target/release/iotgw built {m.get('binary_built', '?')}"
        f"{', older than the sources' if m.get('binary_stale') == '1' else ''}), "
        f"sink: {m.get('sink', '?')}; {m.get('mosquitto', 'Mosquitto ?')}; "
        f"paho-mqtt {m.get('paho', '?')}; Python {m.get('python', '?')}")
    say(f"  nproc {m.get('nproc', '?')}; load average before {m.get('load_before', '?')}, "
        f"after {m.get('load_after', '?')}")
    say("")

    a, sa = load(d, "a.json"), status(d, "a")
    b, sb = load(d, "b.json"), status(d, "b")
    bm, bdb = load(d, "b.metrics.json"), load(d, "b.db.json")
    c, sc = load(d, "c.json"), status(d, "c")
    cdb = load(d, "c.db.json")

    hdr = (f"{'stage':<46} {'msg/s':>9} {'time s':>8} {'pubs done s':>11} "
           f"{'committed':>10} {'lost':>6} {'alerts/expected':>16} {'dup alerts':>10}")
    say(hdr)
    say("-" * len(hdr))

    def row(label, st, r, committed, lost, alerts, dups):
        say(f"{label:<46} {rate_cell(st, r):>9} {num(r.get('elapsed_s'), 2):>8} "
            f"{num(r.get('publishers_done_s'), 2):>11} {num(committed):>10} {num(lost):>6} "
            f"{alerts:>16} {num(dups):>10}")

    recv = a.get("received")
    row("(a) ceiling: Mosquitto -> mosquitto_sub -q 1", sa, a, recv,
        None if recv is None else n - recv, "n/a", None)

    acked = bm.get("acked", b.get("acked"))
    b_alerts = bdb.get("distinct_message_ids")
    row("(b) iotgw: mqtt provider -> SQLite, ack", sb, b, acked,
        None if acked is None else n - acked,
        "-" if b_alerts is None else f"{bdb.get('alerts'):,} / {alerting:,}",
        bdb.get("duplicates"))

    readings = cdb.get("distinct_readings")
    row("(c) naive peer: paho + sqlite3, 1 tx/msg", sc, c, readings,
        None if readings is None else n - readings,
        "-" if cdb.get("alerts") is None else f"{cdb['alerts']:,} / {alerting:,}",
        cdb.get("duplicates"))
    say("  msg/s = N / (start of publishing -> N-th message received (a), acked (b), "
        "committed (c)); pubs done = when the last")
    say("  mosquitto_pub had all its PUBACKs; committed: (a) received, (b) "
        "iotgw_events_acked_total, (c) distinct readings;")
    say("  lost = N - committed; dup alerts = alerts in SQLite - distinct message_ids in them")
    say("")
    ra = a.get("msgs_per_s") if sa == "ok" else None
    rb = b.get("msgs_per_s") if sb == "ok" else None
    rc = c.get("msgs_per_s") if sc == "ok" else None
    say(f"ratios: (b)/(a) = {ratio(rb, ra)}   (b)/(c) = {ratio(rb, rc)}")

    notes = []
    if bm:
        if b_alerts is not None and b_alerts != alerting:
            notes.append(f"(b) alerts with distinct message ids {b_alerts:,}, expected {alerting:,}")
        if bm.get("nacked") or bm.get("rejected") or bdb.get("dead_letters"):
            notes.append(f"(b) nacked {bm.get('nacked')}, rejected {bm.get('rejected')}, "
                         f"dead letters {bdb.get('dead_letters')}")
        if bm.get("received") is not None and bm.get("received") != n:
            notes.append(f"(b) iotgw received {bm['received']:,} events (N = {n:,})")
        notes.append(f"(b) alerts: {bdb.get('primary', '-')} primary + "
                     f"{bdb.get('children', '-')} debounced children (metrics: primary "
                     f"{bm.get('alerts_primary')}, child {bm.get('alerts_child')}, "
                     f"duplicate {bm.get('alerts_duplicate')})")
    if bm.get("batches"):
        notes.append(f"(b) group commit: {bm['batches']:,} store transactions, "
                     f"{bm['batch_events_sum'] / bm['batches']:.1f} events and "
                     f"{1000 * bm['batch_commit_seconds_sum'] / bm['batches']:.1f} ms each on average")
    for st, name in ((sa, "a"), (sb, "b"), (sc, "c")):
        if st not in ("ok", "skipped"):
            notes.append(f"({name}) {st}")
    for note in notes:
        say(f"  {note}")

    say("")
    sd = status(d, "d")
    pub, wait = load(d, "d.pub.json"), load(d, "d.wait.json")
    dm, ddb = load(d, "d.metrics.json"), load(d, "d.db.json")
    say(f"(d) latency: iotgw at {num(float(m.get('rate', 0)))} msg/s offered for "
        f"{m.get('duration', '?')} s ({pub.get('procs', m.get('lat_procs', '?'))} paho publishers, QoS 1)"
        f"{'' if sd == 'ok' else ': ' + sd}")
    if pub.get("messages"):
        offered = float(m.get("rate", 0))
        achieved = pub.get("achieved_rate") or 0
        short = achieved < 0.98 * offered
        say(f"  achieved publish rate {num(achieved)} msg/s over {num(pub.get('publish_s'), 2)} s, "
            f"{pub['messages']:,} messages ({pub.get('alerting', 0):,} alerting)"
            + (f" — BELOW the {num(offered)} offered: the publishers could not keep up"
               if short else ""))
        at_end = pub.get("iotgw_acked_at_publish_end")
        line = f"  iotgw had acked {num(at_end)} when publishing ended"
        if at_end is not None and at_end >= pub["messages"]:
            line += " (all of them: it kept up)"
        elif (pub.get("iotgw_all_acked_at") or (wait.get("t_end") and not wait.get("timeout"))) \
                and pub.get("t_last"):
            t_all = pub.get("iotgw_all_acked_at") or wait["t_end"]
            behind = max(0.0, t_all - pub["t_last"])
            span = t_all - pub["t_first"]
            line += (f"; all {pub['messages']:,} acked {behind:.2f} s after the last publish "
                     f"({pub['messages'] / span:,.0f} msg/s from the first publish)")
        elif wait:
            line += f"; timeout waiting for all {pub['messages']:,} (acked {wait.get('acked', '-')})"
        say(line)
        lat = ddb.get("latency_ms") or {}
        if lat:
            say(f"  added latency, sent_us -> alert created_at in the commit (n = {lat['count']:,}): "
                f"p50 {num(lat.get('p50'), 1)} ms   p90 {num(lat.get('p90'), 1)} ms   "
                f"p99 {num(lat.get('p99'), 1)} ms   max {num(lat.get('max'), 1)} ms")
        ref = load(d, "d0.json").get("latency_ms") or {}
        ref_pub = load(d, "d0.pub.json")
        if ref.get("count"):
            say(f"  reference, the same publishers and load -> Mosquitto -> mosquitto_sub, sent_us -> "
                f"received (n = {ref['count']:,}, achieved {num(ref_pub.get('achieved_rate'))} msg/s): "
                f"p50 {num(ref.get('p50'), 1)} ms   p90 {num(ref.get('p90'), 1)} ms   "
                f"p99 {num(ref.get('p99'), 1)} ms   max {num(ref.get('max'), 1)} ms")
            if lat:
                say(f"  iotgw over the reference: p50 {lat['p50'] - ref['p50']:+,.1f} ms   "
                    f"p99 {lat['p99'] - ref['p99']:+,.1f} ms")
        if dm.get("batches"):
            say(f"  group commit: {dm['batches']:,} store transactions, "
                f"{dm['batch_events_sum'] / dm['batches']:.1f} events and "
                f"{1000 * dm['batch_commit_seconds_sum'] / dm['batches']:.1f} ms each on average "
                + (f"({1000 * dm['batch_store_seconds_sum'] / dm['batches']:.1f} ms of it in the store "
                   f"transaction) " if dm.get("batch_store_seconds_sum") else "")
                + "(created_at is taken inside the transaction, so the commit adds up to that)")
        if dm:
            acked_d = dm.get("acked")
            say(f"  lost {pub['messages'] - (acked_d or 0):,} (acked {num(acked_d)} / "
                f"{pub['messages']:,}; alerts {num(ddb.get('alerts'))} / "
                f"{pub.get('alerting', 0):,}), duplicate alerts {num(ddb.get('duplicates'))}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
