#!/usr/bin/env python3
"""A minimal business app that runs beside iotgw in one network namespace.

It shows the sidecar contract from the app's side, with the standard library only:

* it waits until iotgw's `/ready` answers 200 on http://127.0.0.1:8080;
* it registers its devices through the API on localhost (`POST /api/v1/devices`,
  with the bearer token when one is set);
* it receives alerts on its own webhook on 127.0.0.1:9000 (`POST /alerts`), checks the
  `X-Iotgw-Signature` HMAC and drops redeliveries by `Idempotency-Key`.

Everything it does is printed on stdout as one JSON object per line
(`{"event": "ready" | "registered" | "alert" | ..., ...}`), so a test or a person can
follow it with `docker logs`.

Environment:
  IOTGW_URL          the gateway's API (default http://127.0.0.1:8080)
  IOTGW_API_TOKEN    bearer token for the API (default: none)
  WEBHOOK_LISTEN     host:port of the webhook (default 127.0.0.1:9000)
  WEBHOOK_SECRET     shared secret of the webhook sink's HMAC (default: no check)
  WEBHOOK_DELAY_MS   answer each alert after this many ms, like a slow app (default 0)
  DEVICES            comma-separated device ids to register (default pump-1)
  READY_TIMEOUT_S    how long to wait for /ready before giving up (default 120)

Once its devices are registered it creates /tmp/app-ready (the image's HEALTHCHECK).

`app.py wait-gateway-stopped [SECONDS]` waits until the gateway's /live stops answering
(a Kubernetes preStop hook for the app: the app keeps receiving alerts while iotgw drains).
`app.py api METHOD PATH` calls the API once and prints {"status": ..., "body": ...}.
"""

import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GATEWAY = os.environ.get("IOTGW_URL", "http://127.0.0.1:8080").rstrip("/")
TOKEN = os.environ.get("IOTGW_API_TOKEN", "")
SECRET = os.environ.get("WEBHOOK_SECRET", "").encode()
DELAY_S = int(os.environ.get("WEBHOOK_DELAY_MS", "0")) / 1000.0
READY_MARKER = "/tmp/app-ready"


def say(event, **fields):
    """One JSON line on stdout."""
    fields["event"] = event
    print(json.dumps(fields, sort_keys=True), flush=True)


def call(method, path, body=None, timeout=3.0):
    """Calls the gateway; returns (status, parsed JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(GATEWAY + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if TOKEN:
        req.add_header("Authorization", "Bearer " + TOKEN)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


class Webhook(BaseHTTPRequestHandler):
    """Receives iotgw's webhook sink."""

    seen = set()
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/alerts":
            self.send_error(404)
            return
        signature_ok = None
        if SECRET:
            want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            signature_ok = hmac.compare_digest(want, self.headers.get("X-Iotgw-Signature", ""))
            if not signature_ok:
                say("alert_rejected", reason="bad signature")
                self.send_error(401, "bad signature")
                return
        if DELAY_S:
            time.sleep(DELAY_S)
        key = self.headers.get("Idempotency-Key", "")
        with Webhook.lock:
            duplicate = key in Webhook.seen
            Webhook.seen.add(key)
        doc = json.loads(body)
        alert = doc.get("data") or {}
        if isinstance(alert, str):
            alert = json.loads(alert)
        say(
            "alert",
            device=alert.get("msdyn_deviceid"),
            description=alert.get("msdyn_description"),
            token=alert.get("msdyn_alerttoken"),
            idempotency_key=key,
            duplicate=duplicate,
            signature_ok=signature_ok,
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, fmt, *args):  # keep stdout to the JSON lines
        pass


def wait_ready(timeout_s):
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout_s:
        try:
            status, body = call("GET", "/ready", timeout=2.0)
            if status == 200:
                say("ready", after_ms=int((time.monotonic() - start) * 1000))
                return True
            last = body
        except OSError as err:  # not listening yet
            last = str(err)
        time.sleep(0.2)
    say("not_ready", waited_s=timeout_s, last=last)
    return False


def register(device_id):
    status, body = call(
        "POST", "/api/v1/devices", {"msdyn_deviceid": device_id, "msdyn_category": "pump"}
    )
    if status in (200, 201, 409):
        say("registered", device=device_id, status=status)
        return True
    say("register_failed", device=device_id, status=status, body=body)
    return False


def wait_gateway_stopped(timeout_s):
    """preStop hook: returns once /live stops answering, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            call("GET", "/live", timeout=1.0)
        except OSError:
            return 0
        time.sleep(0.5)
    return 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "wait-gateway-stopped":
        return wait_gateway_stopped(float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
    if len(sys.argv) == 4 and sys.argv[1] == "api":
        status, body = call(sys.argv[2], sys.argv[3])
        print(json.dumps({"status": status, "body": body}))
        return 0 if 200 <= status < 300 else 1
    host, port = os.environ.get("WEBHOOK_LISTEN", "127.0.0.1:9000").rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say("webhook_listening", listen=f"{host}:{port}")

    def stop(signum, _frame):
        say("stopping", signal=signum)
        server.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if not wait_ready(float(os.environ.get("READY_TIMEOUT_S", "120"))):
        return 1
    devices = [d.strip() for d in os.environ.get("DEVICES", "pump-1").split(",") if d.strip()]
    if not all(register(d) for d in devices):
        return 1
    # The image's HEALTHCHECK (and compose's depends_on: service_healthy) looks for it.
    with open(READY_MARKER, "w", encoding="utf-8") as marker:
        marker.write("registered\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
