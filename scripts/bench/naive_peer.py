#!/usr/bin/env python3
"""The naive peer of scripts/bench-e2e.sh: what one would write by hand instead of iotgw.

A paho-mqtt 2.x client (MQTT 5, clean start) subscribes at QoS 1 to devices/+/telemetry
with manual acks. For every message, in paho's network thread: one SQLite transaction
(WAL mode, synchronous=NORMAL as iotgw's store) that INSERTs the reading into `readings`
and, when temperature > 75, an alert row into `alerts` (token = device id + message_id,
UNIQUE, a redelivery writes no second alert); after the COMMIT, the PUBACK
(`client.ack`). Receive Maximum 128, the same as iotgw's mqtt provider.

    naive_peer.py --port P --db FILE --n N --ready FILE --done FILE [--timeout S]

Writes --ready once the SUBACK arrived, and --done ({"committed", "t_nth", "alerts"}, the
wall-clock time of the N-th commit) when N transactions have committed, then disconnects
and exits 0. Exits 124 after --timeout seconds without reaching N (after writing
DONE.partial with the count committed so far).
"""

import argparse
import json
import sqlite3
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from benchlib import now, write_json_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT    NOT NULL,
    message_id  TEXT,
    temperature REAL,
    payload     TEXT    NOT NULL,
    received_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS alerts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    token       TEXT    NOT NULL UNIQUE,
    device_id   TEXT    NOT NULL,
    description TEXT    NOT NULL,
    alert_data  TEXT    NOT NULL,
    created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--done", required=True)
    ap.add_argument("--topic", default="devices/+/telemetry")
    ap.add_argument("--client-id", default="bench-naive-peer")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()

    db = sqlite3.connect(a.db, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)

    state = {"committed": 0, "alerts": 0, "bad": 0, "finished": False, "error": None}

    def on_connect(client, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            state["error"] = f"CONNACK {reason_code}"
            client.disconnect()
            return
        client.subscribe(a.topic, qos=1)

    def on_subscribe(client, _userdata, _mid, reason_codes, _properties):
        if any(rc.is_failure for rc in reason_codes):
            state["error"] = f"SUBACK {reason_codes}"
            client.disconnect()
            return
        write_json_atomic(a.ready, {"subscribed": True})

    def on_message(client, _userdata, msg):
        device_id = msg.topic.split("/")[1]
        raw = msg.payload.decode("utf-8", "replace")
        try:
            doc = json.loads(raw)
            temp = doc.get("temperature")
            message_id = doc.get("message_id")
        except (ValueError, AttributeError):
            doc, temp, message_id = None, None, None
            state["bad"] += 1
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO readings (device_id, message_id, temperature, payload) "
                "VALUES (?, ?, ?, ?)", (device_id, message_id, temp, raw))
            if isinstance(temp, (int, float)) and temp > 75:
                cur = db.execute(
                    "INSERT INTO alerts (token, device_id, description, alert_data) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (token) DO NOTHING",
                    (f"{device_id}:{message_id}", device_id,
                     f"Temperature {temp} C above 75 C on {device_id}", raw))
                state["alerts"] += cur.rowcount
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
        client.ack(msg.mid, msg.qos)
        state["committed"] += 1
        if state["committed"] == a.n:
            write_json_atomic(a.done, {"committed": state["committed"], "t_nth": now(),
                                       "alerts": state["alerts"], "timeout": False})
            state["finished"] = True
            client.disconnect()

    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=a.client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 128
    props.SessionExpiryInterval = 0

    timer = threading.Timer(a.timeout, client.disconnect)
    timer.daemon = True
    timer.start()
    client.connect(a.host, a.port, keepalive=30, clean_start=True, properties=props)
    client.loop_forever()
    timer.cancel()
    db.close()
    if state["error"]:
        print(f"naive_peer: {state['error']}", file=sys.stderr)
        return 1
    if not state["finished"]:
        write_json_atomic(a.done + ".partial", {"committed": state["committed"],
                                                "alerts": state["alerts"], "timeout": True})
        print(f"naive_peer: timeout after {state['committed']} committed", file=sys.stderr)
        return 124
    return 0


if __name__ == "__main__":
    sys.exit(main())
