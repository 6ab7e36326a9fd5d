#!/usr/bin/env python3
"""Reads what a bench-e2e stage left behind and prints one JSON object.

  analyze.py iotgw-db --db FILE [--latency]
      iotgw's SQLite file (registry/migrations/sqlite/0001_init.sql): alerts, distinct
      alert tokens, distinct message ids (from the raw payload in alert_data), duplicates
      (alerts minus distinct message ids), primary/child split, readings of dead letters;
      with --latency, per alert created_at (text YYYY-MM-DDTHH:MM:SS.ffffffZ, written in
      the commit's transaction) minus the payload's sent_us: count, p50, p90, p99, max, in ms.
  analyze.py sub-latency --file FILE [--prefix P]
      `mosquitto_sub -F '%U %p'` output: per message whose message_id starts with P, the
      receive time minus the payload's sent_us: count, p50, p90, p99, max, in ms.
  analyze.py peer-db --db FILE
      the naive peer's file: readings, distinct message ids, alerts, distinct tokens.
  analyze.py metrics --file FILE
      a /metrics scrape: iotgw_events_{received,acked,nacked}_total,
      iotgw_events_rejected_total, iotgw_alerts_total by kind, iotgw_dead_letters_total,
      and the group-commit histograms iotgw_batch_events / iotgw_batch_commit_seconds
      (count and sum) when the binary exports them.
"""

import argparse
import calendar
import json
import math
import sqlite3
import sys
from datetime import datetime

from benchlib import metric_sum, parse_metrics


def epoch_us(text):
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return calendar.timegm(dt.timetuple()) * 1_000_000 + dt.microsecond


def percentile(sorted_values, p):
    """Nearest rank."""
    if not sorted_values:
        return None
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def connect_ro(path):
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def iotgw_db(a):
    db = connect_ro(a.db)
    rows = db.execute("SELECT alert_token, alert_data, created_at, parent_alert FROM alerts")
    alerts, tokens, ids, primary, unparsed = 0, set(), set(), 0, 0
    latencies = []
    for token, data, created_at, parent in rows:
        alerts += 1
        tokens.add(token)
        if parent is None:
            primary += 1
        try:
            doc = json.loads(data)
            ids.add(doc["message_id"])
            sent_us = int(doc["sent_us"])
        except (ValueError, KeyError, TypeError):
            unparsed += 1
            continue
        if a.latency:
            latencies.append((epoch_us(created_at) - sent_us) / 1000.0)
    dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    db.close()
    out = {"alerts": alerts, "distinct_tokens": len(tokens), "distinct_message_ids": len(ids),
           "duplicates": alerts - len(ids), "primary": primary, "children": alerts - primary,
           "unparsed_alert_data": unparsed, "dead_letters": dead}
    if a.latency:
        out["latency_ms"] = latency_summary(latencies)
    return out


def latency_summary(latencies):
    latencies.sort()
    return {
        "count": len(latencies),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else None,
        "min": latencies[0] if latencies else None,
    }


def sub_latency(a):
    latencies = []
    with open(a.file, encoding="utf-8") as f:
        for line in f:
            stamp, _, payload = line.partition(" ")
            try:
                doc = json.loads(payload)
                if not str(doc.get("message_id", "")).startswith(a.prefix):
                    continue
                sec, _, frac = stamp.partition(".")
                received_us = int(sec) * 1_000_000 + int((frac + "000000")[:6])
                latencies.append((received_us - int(doc["sent_us"])) / 1000.0)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return {"latency_ms": latency_summary(latencies)}


def peer_db(a):
    db = connect_ro(a.db)
    readings, distinct = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM readings").fetchone()
    alerts, tokens = db.execute("SELECT COUNT(*), COUNT(DISTINCT token) FROM alerts").fetchone()
    db.close()
    return {"readings": readings, "distinct_readings": distinct, "alerts": alerts,
            "distinct_tokens": tokens, "duplicates": alerts - tokens}


def metrics(a):
    with open(a.file, encoding="utf-8") as f:
        m = parse_metrics(f.read())
    return {
        "received": int(metric_sum(m, "iotgw_events_received_total")),
        "acked": int(metric_sum(m, "iotgw_events_acked_total")),
        "nacked": int(metric_sum(m, "iotgw_events_nacked_total")),
        "rejected": int(metric_sum(m, "iotgw_events_rejected_total")),
        "alerts_primary": int(metric_sum(m, "iotgw_alerts_total", 'kind="primary"')),
        "alerts_child": int(metric_sum(m, "iotgw_alerts_total", 'kind="child"')),
        "alerts_duplicate": int(metric_sum(m, "iotgw_alerts_total", 'kind="duplicate"')),
        "dead_letters": int(metric_sum(m, "iotgw_dead_letters_total")),
        # Group commit (when the binary has it): events per store transaction, commit time.
        "batches": int(metric_sum(m, "iotgw_batch_events_count")) or None,
        "batch_events_sum": metric_sum(m, "iotgw_batch_events_sum"),
        "batch_commit_seconds_sum": metric_sum(m, "iotgw_batch_commit_seconds_sum"),
        "batch_store_seconds_sum": metric_sum(m, "iotgw_batch_store_seconds_sum"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("iotgw-db")
    p.add_argument("--db", required=True)
    p.add_argument("--latency", action="store_true")
    p = sub.add_parser("sub-latency")
    p.add_argument("--file", required=True)
    p.add_argument("--prefix", default="")
    p = sub.add_parser("peer-db")
    p.add_argument("--db", required=True)
    p = sub.add_parser("metrics")
    p.add_argument("--file", required=True)
    a = ap.parse_args()
    try:
        out = {"iotgw-db": iotgw_db, "peer-db": peer_db, "sub-latency": sub_latency,
               "metrics": metrics}[a.cmd](a)
    except (sqlite3.Error, OSError) as e:
        out = {"error": str(e)}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
