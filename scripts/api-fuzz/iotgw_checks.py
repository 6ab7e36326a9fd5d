"""iotgw's own schemathesis checks, loaded through SCHEMATHESIS_HOOKS=iotgw_checks.

The issue's promise, checked on every response schemathesis gets: no 5xx (its built-in
not_a_server_error), and every 4xx is the API's JSON error naming what is wrong.
"""

import json
import re

import schemathesis

# A 400 names the field: "invalid <field>: ...", or a provider's refusal of one,
# "<instance>: invalid <field>: ...".
NAMES_THE_FIELD = re.compile(r"(^|: )invalid [^:\s][^:]*: \S")


@schemathesis.check
def every_4xx_is_a_json_error_naming_the_problem(ctx, response, case):
    status = response.status_code
    if not 400 <= status < 500:
        return None
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        raise AssertionError(
            f"{status} without a JSON body: {response.content[:200]!r}"
        )
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise AssertionError(f"{status} body is not {{\"error\": {{...}}}}: {body}")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not code:
        raise AssertionError(f"{status} error without a code: {body}")
    if not isinstance(message, str) or not message.strip():
        raise AssertionError(f"{status} error without a message: {body}")
    if status == 400 and not NAMES_THE_FIELD.search(message):
        raise AssertionError(f"400 that does not name the field: {message!r}")
    return None
