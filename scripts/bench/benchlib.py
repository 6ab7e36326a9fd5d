"""Shared by the bench-e2e helpers: Prometheus text parsing, /metrics scraping, children
that die with their parent, atomic JSON files. Standard library only."""

import ctypes
import http.client
import json
import os
import signal
import time
from urllib.parse import urlsplit

PR_SET_PDEATHSIG = 1


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the helper that started it dies, even by
    SIGKILL, so no publisher or subscriber outlives a killed run (Linux only; a no-op
    elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def parse_metrics(text):
    """Prometheus text -> {metric name: [(labels text, value)]}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            close = line.rfind("}")
            name, labels, rest = line[:brace], line[brace + 1:close], line[close + 1:]
        else:
            name, labels, rest = line[:space], "", line[space:]
        fields = rest.split()
        if not fields:
            continue
        try:
            out.setdefault(name, []).append((labels, float(fields[0])))
        except ValueError:
            continue
    return out


def metric_sum(metrics, name, label_filter=None):
    total = 0.0
    for labels, value in metrics.get(name, []):
        if label_filter is None or label_filter in labels:
            total += value
    return total


class Scraper:
    """GET /metrics over one kept-alive connection (reconnects on error)."""

    def __init__(self, url, timeout=2.0):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path or "/metrics"
        self.timeout = timeout
        self.conn = None

    def get(self):
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port,
                                                           timeout=self.timeout)
                self.conn.request("GET", self.path)
                resp = self.conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                if resp.status != 200:
                    raise OSError(f"/metrics answered {resp.status}")
                return parse_metrics(body)
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        return {}

    def acked(self):
        return metric_sum(self.get(), "iotgw_events_acked_total")


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.write("\n")
    os.replace(tmp, path)


def now():
    """Wall clock in seconds; the helpers compare times across processes with it."""
    return time.time()
