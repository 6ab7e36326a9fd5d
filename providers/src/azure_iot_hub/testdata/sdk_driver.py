"""Drives the official Azure IoT Hub service SDK for Python (`azure-iot-hub`) against a
local recording fake of the hub, for iotgw's differential tests.

Reads a plan from stdin: {"connection_string": ..., "amqp_port": <int or null>,
"ops": [{"op": ..., ...}, ...]} and prints one JSON line per op:
{"ok": true, "result": ...} or {"ok": false, "error": "..."}.

Only two things are changed in the SDK's environment, both about *where* it connects and
*what it trusts*, never about what it sends:
- the CA bundle: REQUESTS_CA_BUNDLE (set by the test) for the REST calls, and uamqp's
  `certifi.where()` for the AMQP TLS (uamqp reads no environment variable for it);
- uamqp's AMQPS port constant (the SDK always connects to HostName:5671), when the plan
  names the fake's AMQP port.
"""

import json
import os
import sys

import six  # noqa: F401  azure-iot-hub imports it without declaring it

plan = json.load(sys.stdin)

if os.environ.get("IOTGW_SDK_DEBUG"):  # the SDK's own logs on stderr, for diagnosis
    import logging

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)

if os.environ.get("IOTGW_TEST_CA"):
    import certifi

    _ca = os.environ["IOTGW_TEST_CA"]
    certifi.where = lambda: _ca

if plan.get("amqp_port"):
    import uamqp.constants

    uamqp.constants.DEFAULT_AMQPS_PORT = int(plan["amqp_port"])

from azure.iot.hub import IoTHubRegistryManager  # noqa: E402
from azure.iot.hub.models import (  # noqa: E402
    AuthenticationMechanism,
    CloudToDeviceMethod,
    ExportImportDevice,
    SymmetricKey,
    Twin,
    TwinProperties,
)
from azure.iot.hub.sastoken import SasToken  # noqa: E402


def as_json(v):
    if v is None:
        return None
    if hasattr(v, "as_dict"):
        return v.as_dict()
    if isinstance(v, list):
        return [as_json(x) for x in v]
    return v


def sas(op):
    tok = SasToken(op["uri"], op["key"], op.get("key_name"))
    # Pin the expiry, then let the SDK build the token with its own code.
    tok.expiry_time = int(op["expiry"])
    tok._token = tok._build_token()
    return str(tok)


registry = None
if plan.get("connection_string"):
    registry = IoTHubRegistryManager.from_connection_string(plan["connection_string"])


def run(op):
    kind = op["op"]
    if kind == "sas":
        return sas(op)
    if kind == "create_device_with_sas":
        return registry.create_device_with_sas(
            op["device_id"], op["primary_key"], op["secondary_key"], op.get("status", "enabled")
        )
    if kind == "update_device_with_sas":
        return registry.update_device_with_sas(
            op["device_id"], op["etag"], op["primary_key"], op["secondary_key"], op.get("status", "enabled")
        )
    if kind == "get_device":
        return registry.get_device(op["device_id"])
    if kind == "delete_device":
        return registry.delete_device(op["device_id"])
    if kind == "get_twin":
        return registry.get_twin(op["device_id"])
    if kind == "update_twin":
        t = op["twin"]
        props = t.get("properties") or {}
        twin = Twin(
            tags=t.get("tags"),
            properties=TwinProperties(desired=props.get("desired")) if props else None,
        )
        return registry.update_twin(op["device_id"], twin)
    if kind == "invoke_device_method":
        m = CloudToDeviceMethod(
            method_name=op["method_name"],
            payload=op["payload"],
            response_timeout_in_seconds=op["response_timeout"],
            connect_timeout_in_seconds=op["connect_timeout"],
        )
        return registry.invoke_device_method(op["device_id"], m)
    if kind == "bulk_create":
        devices = [
            ExportImportDevice(
                id=d["id"],
                import_mode="create",
                status="enabled",
                authentication=AuthenticationMechanism(
                    type="sas",
                    symmetric_key=SymmetricKey(primary_key=d["primary_key"], secondary_key=d["secondary_key"]),
                ),
            )
            for d in op["devices"]
        ]
        return registry.bulk_create_or_update_devices(devices)
    if kind == "get_service_statistics":
        return registry.get_service_statistics()
    if kind == "send_c2d_message":
        registry.send_c2d_message(op["device_id"], op["message"], op.get("properties") or {})
        return None
    raise ValueError("unknown op " + kind)


for op in plan["ops"]:
    try:
        print(json.dumps({"ok": True, "result": as_json(run(op))}, default=str), flush=True)
    except Exception as e:  # report, let the test decide
        print(json.dumps({"ok": False, "error": "%s: %s" % (type(e).__name__, e)}), flush=True)

if registry is not None and registry.amqp_svc_client is not None:
    registry.amqp_svc_client.disconnect_sync()
    registry.amqp_svc_client = None
