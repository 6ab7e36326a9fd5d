#!/usr/bin/env bash
# Checks the files a platform team imports to watch iotgw:
#
#   deploy/prometheus/rules.yml       promtool check rules (syntax, PromQL, templates)
#   deploy/prometheus/rules.test.yml  promtool test rules (each alert fires and stays quiet
#                                     when it should, with its exact labels and annotations)
#   deploy/grafana/iotgw.json         valid JSON (python3 -m json.tool), and every panel's
#                                     query parses as PromQL (promtool check rules, with the
#                                     dashboard's variables filled in)
#
# That both name only metrics the gateway exports is checked by a cargo test
# (gateway/src/metrics.rs: the_dashboard_and_the_alert_rules_name_only_metrics_the_gateway_exports).
#
# promtool comes from Debian's prometheus package: bash scripts/install-test-deps.sh. A
# missing promtool or python3 is an error, never a skip (under CI=true or not).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '[check-observability] %s\n' "$*" >&2; }
fail() {
    say "ERROR: $*"
    exit 1
}

RULES=deploy/prometheus/rules.yml
RULE_TESTS=deploy/prometheus/rules.test.yml
DASHBOARD=deploy/grafana/iotgw.json

if ! command -v promtool >/dev/null 2>&1; then
    fail "promtool not found on PATH; it checks and tests $RULES. Install it with: bash scripts/install-test-deps.sh (Debian's prometheus package)${CI:+ (CI=$CI: missing tools fail, they are not skipped)}"
fi
if ! command -v python3 >/dev/null 2>&1; then
    fail "python3 not found on PATH; it validates $DASHBOARD"
fi
for f in "$RULES" "$RULE_TESTS" "$DASHBOARD"; do
    [ -f "$f" ] || fail "$f is missing"
done

say "promtool check rules $RULES"
promtool check rules "$RULES" || fail "promtool check rules refused $RULES"

say "promtool test rules $RULE_TESTS"
promtool test rules "$RULE_TESTS" || fail "the alert rule unit tests of $RULE_TESTS failed"

say "validating $DASHBOARD as JSON"
python3 -m json.tool "$DASHBOARD" >/dev/null || fail "$DASHBOARD is not valid JSON"

say "checking that every query of $DASHBOARD parses as PromQL"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Each panel query becomes a recording rule (JSON is YAML), with Grafana's interval
# variables as durations and the template variables as the regex ".*".
python3 - "$DASHBOARD" "$tmp/dashboard-queries.yml" <<'EOF' || fail "$DASHBOARD has queries that cannot be checked (see above)"
import json, re, sys

dashboard_file, out = sys.argv[1], sys.argv[2]
with open(dashboard_file) as f:
    dashboard = json.load(f)

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

rules, problems = [], []
for p in panels(dashboard.get("panels", [])):
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        where = f"panel {p.get('id')} ({p.get('title')!r}) query {t.get('refId')}"
        if not expr.strip():
            problems.append(f"{where}: empty query")
            continue
        uid = (t.get("datasource") or p.get("datasource") or {}).get("uid")
        if uid != "${DS_PROMETHEUS}":
            problems.append(f"{where}: data source {uid!r}, not ${{DS_PROMETHEUS}}")
        for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", expr)
        rules.append({"record": f"dashboard_panel_{p.get('id')}_{t.get('refId')}", "expr": expr})
if not rules:
    problems.append("no panel queries found")
for problem in problems:
    print(f"[check-observability] {problem}", file=sys.stderr)
with open(out, "w") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)
print(f"[check-observability] {len(rules)} queries", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
promtool check rules "$tmp/dashboard-queries.yml" >/dev/null \
    || fail "$DASHBOARD has a query that is not valid PromQL (promtool's message above)"

say "ok: $RULES, $RULE_TESTS and $DASHBOARD"
