#!/usr/bin/env bash
# End-to-end benchmark, side by side on one machine in one run: how many QoS 1 telemetry
# messages per second go from MQTT publishers to committed, acknowledged results through
#
#   (a) ceiling  Mosquitto alone: PUBLISHERS `mosquitto_pub -q 1 -l` -> one `mosquitto_sub -q 1`
#   (b) iotgw    the same publishers and messages -> the same Mosquitto -> iotgw's mqtt
#                provider -> SQLite (one rule firing on 10 %) -> ack; the clock stops when
#                iotgw_events_acked_total reaches N
#   (c) naive    the same -> scripts/bench/naive_peer.py: paho-mqtt with manual acks, one
#                sqlite3 transaction per message (reading + alert), ack after commit
#   (d) latency  iotgw at a fixed offered load (RATE msg/s for DURATION s, paho publishers):
#                publish time (sent_us in the payload) -> the alert's created_at in SQLite;
#                first, as its reference, the same publishers at the same load to a plain
#                `mosquitto_sub -q 1` through the same Mosquitto: sent_us -> received
#
# then one table: msg/s, ratios (b)/(a) and (b)/(c), losses, duplicate alerts, load average
# before and after, nproc, the iotgw commit. `scripts/bench-e2e.sh --help` lists the knobs.
#
# Needs: Mosquitto 2 and mosquitto-clients (scripts/install-test-deps.sh, called here),
# Python 3 with venv (paho-mqtt 2.x is installed from PyPI into target/bench-venv), curl,
# cargo (target/release/iotgw is built with `cargo build --release -p iotgw` when missing).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-e2e.sh [--help]

End-to-end throughput of iotgw beside a Mosquitto-only ceiling and a naive Python peer,
plus iotgw's added latency at a fixed load beside the same load through Mosquitto alone;
prints one table. Every stage uses a fresh database; every process started is stopped on
exit.

Environment (defaults in brackets):
  N               messages per throughput stage (a, b, c)                        [50000]
  PUBLISHERS      mosquitto_pub -q 1 -l processes, one device each (DEVICES = PUBLISHERS) [10]
  RATE            offered load of the latency stage (d), messages/s              [10000]
  DURATION        how long stage (d) publishes, seconds                          [10]
  LAT_PROCS       paho publisher processes sharing RATE in stage (d)             [2]
  STAGES          which stages to run, any of the letters a b c d                [abcd]
  STAGE_TIMEOUT   seconds one stage may take before it is reported as timeout    [300]
  READY_TIMEOUT   seconds iotgw may take to answer 200 on /ready                 [60]
  SINK            iotgw alert sink: none, or file (JSON lines in the temp dir)   [none]
  BATCH_WAIT_MS   iotgw's pipeline.batch_max_wait_ms; empty: the config default  []
  SYNC            iotgw's store.sqlite_synchronous (full, normal); empty: the default []
  READINGS        1: iotgw keeps readings (readings.enabled = true), 0: it keeps none;
                  empty: the config default (on)                                []
  REBUILD         1: run `cargo build --release -p iotgw` even if the binary exists [0]
  BUILD_TIMEOUT   seconds that build may take, waiting for the cargo lock included [3600]
  KEEP            1: keep the temp directory (configs, logs, databases)          [0]
  IOTGW_BENCH_VENV  the Python venv with paho-mqtt                [target/bench-venv]

The temp directory is kept when a stage fails. Exit status: 0 when every stage ran to
completion, 1 otherwise (a stage that timed out shows "timeout" in the table), 64 on bad
arguments or settings.
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) printf 'bench-e2e: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$repo/scripts/bench"
cd "$repo"

N="${N:-50000}"
PUBLISHERS="${PUBLISHERS:-10}"
RATE="${RATE:-10000}"
DURATION="${DURATION:-10}"
LAT_PROCS="${LAT_PROCS:-2}"
STAGES="${STAGES:-abcd}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-300}"
READY_TIMEOUT="${READY_TIMEOUT:-60}"
SINK="${SINK:-none}"
BATCH_WAIT_MS="${BATCH_WAIT_MS:-}"
SYNC="${SYNC:-}"
READINGS="${READINGS:-}"
REBUILD="${REBUILD:-0}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-3600}"
KEEP="${KEEP:-0}"
venv="${IOTGW_BENCH_VENV:-$repo/target/bench-venv}"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/iotgw"

# The helpers import each other from scripts/bench: leave no __pycache__ in the tree.
export PYTHONDONTWRITEBYTECODE=1

say() { printf '[bench-e2e] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

for var in N PUBLISHERS RATE DURATION LAT_PROCS STAGE_TIMEOUT READY_TIMEOUT BUILD_TIMEOUT; do
    if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
        say "$var must be a whole number of at least 1, not '${!var}'"
        exit 64
    fi
done
if [ "$PUBLISHERS" -gt 99 ]; then say "PUBLISHERS must be at most 99"; exit 64; fi
if ! [[ "$STAGES" =~ ^[abcd]+$ ]]; then say "STAGES takes the letters a b c d, not '$STAGES'"; exit 64; fi
case "$SINK" in none | file) ;; *) say "SINK must be none or file, not '$SINK'"; exit 64 ;; esac

# The gateway must read only the config written here: drop IOTGW_* overrides (IOTGW_LOG stays).
while IFS= read -r v; do
    [ "$v" = IOTGW_LOG ] || unset "$v"
done < <(compgen -e | grep '^IOTGW_' || true)

# ---------------------------------------------------------------- processes and clean-up
tracked=()
track() { tracked+=("$1"); }
untrack() {
    local keep=() p
    for p in "${tracked[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    tracked=("${keep[@]+"${keep[@]}"}")
}

# Waits for a background job we started, bounded by its own timeout; returns its status.
bg_wait() {
    local pid="$1" rc=0
    track "$pid"
    wait "$pid" || rc=$?
    untrack "$pid"
    return "$rc"
}

# SIGTERM to the process, SIGKILL after $2 seconds; reaps it.
stop_pid() {
    local pid="$1" grace="${2:-5}" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

work=""
failed=0
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${tracked[@]+"${tracked[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${tracked[@]+"${tracked[@]}"}"; do stop_pid "$p" 3; done
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "$KEEP" = 1 ] || [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
            say "kept $work (configs, logs, databases)"
        else
            rm -rf "$work"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a helper that has its own --timeout with a hard limit on top (exit 124 when it hits):
# "${bounded[@]}" CMD... & (a simple command, so $! is timeout's pid and SIGTERM reaches it).
bounded=(timeout -k 10 "$((STAGE_TIMEOUT + 60))")

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# One stage's progress line: "(x) what: 12345 msg/s" or "(x) what: timeout".
report() {
    local stage="$1" what="$2" key="$3" st v
    st="$(cat "$results/$stage.status")"
    v="$(jget "$results/$stage.json" "$key")"
    [ "$stage" != d ] || v="$(jget "$results/d.pub.json" "$key")"
    if [ "$st" = ok ] && [ -n "$v" ]; then say "($stage) $what: ${v%%.*} msg/s"; else say "($stage) $what: $st"; fi
}

jget() { # jget FILE KEY -> the value, "" when missing
    "$py" -c 'import json, sys
try:
    v = json.load(open(sys.argv[1])).get(sys.argv[2])
except (OSError, ValueError):
    v = None
print("" if v is None else v)' "$1" "$2"
}

# Writes <stage>.status from a helper's exit status.
set_status() {
    local stage="$1" rc="$2" what="${3:-}"
    case "$rc" in
        0) echo ok ;;
        124) echo "timeout${what:+ ($what)}" ;;
        *) echo "failed${what:+: $what} (exit $rc; logs in the kept temp dir)" ;;
    esac >"$results/$stage.status"
    [ "$rc" -eq 0 ] || failed=1
}

# ---------------------------------------------------------------- set-up
say "dependencies: Mosquitto (scripts/install-test-deps.sh), paho-mqtt (scripts/bench/install-bench-venv.sh)"
bash "$repo/scripts/install-test-deps.sh" >/dev/null
IOTGW_BENCH_VENV="$venv" bash "$bench/install-bench-venv.sh"
py="$venv/bin/python"
for tool in mosquitto mosquitto_pub mosquitto_sub curl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH"
done

if [ ! -x "$bin" ] || [ "$REBUILD" = 1 ]; then
    say "building: cargo build --release -p iotgw (waits if another build holds the cargo lock)"
    timeout "$BUILD_TIMEOUT" cargo build --release -p iotgw ||
        die "cargo build --release -p iotgw failed or took over $BUILD_TIMEOUT s"
fi
[ -x "$bin" ] || die "$bin is missing after the build"

work="$(mktemp -d "${TMPDIR:-/tmp}/iotgw-bench.XXXXXX")"
results="$work/results"
mkdir -p "$results"

commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$commit" != unknown ] && [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit+dirty"
fi
binary_stale=0
if [ -n "$(find "$repo/gateway" "$repo/registry" "$repo/config" "$repo/providers" \
    "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$bin" \( -name '*.rs' -o -name '*.toml' \
    -o -name '*.lock' -o -name '*.sql' \) -print -quit 2>/dev/null)" ]; then
    binary_stale=1
    say "note: sources are newer than $bin (REBUILD=1 rebuilds it)"
fi

# ---------------------------------------------------------------- payloads, broker
"$py" "$bench/gen_payloads.py" --n "$N" --devices "$PUBLISHERS" --out "$work/payloads" \
    >"$work/payloads.json"
files=("$work"/payloads/*.jsonl)
devices=()
for f in "${files[@]}"; do devices+=("$(basename "$f" .jsonl)"); done
alerting="$(jget "$work/payloads.json" alerting)"
payload_bytes="$(( $(jget "$work/payloads.json" bytes) / N ))"

mq_port="$(free_port)"
cat >"$work/mosquitto.conf" <<EOF
# bench-e2e: loopback only, no auth, nothing on disk.
listener $mq_port 127.0.0.1
allow_anonymous true
persistence false
# Unlimited per-client queue: a consumer slower than the publishers must not lose QoS 1
# messages (the default, 1000, drops what is beyond it).
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
EOF
mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
mq_pid=$!
track "$mq_pid"
for ((i = 0; ; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$mq_port") 2>/dev/null; then break; fi
    kill -0 "$mq_pid" 2>/dev/null || die "mosquitto exited: $(tail -3 "$work/mosquitto.log")"
    [ "$i" -lt 200 ] || die "timeout: mosquitto does not listen on 127.0.0.1:$mq_port after 10 s"
    sleep 0.05
done

{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "n=$N"
    echo "publishers=$PUBLISHERS"
    echo "devices=$PUBLISHERS"
    echo "alerting=$alerting"
    echo "payload_bytes=$payload_bytes"
    echo "rate=$RATE"
    echo "duration=$DURATION"
    echo "lat_procs=$LAT_PROCS"
    echo "sink=$SINK"
    echo "commit=$commit"
    echo "binary_built=$(date -u -r "$bin" '+%Y-%m-%d %H:%M UTC')"
    echo "binary_stale=$binary_stale"
    echo "mosquitto=$(mosquitto -h 2>&1 | head -1 | sed 's/^mosquitto version/Mosquitto/')"
    echo "paho=$("$py" -c 'import paho.mqtt; print(paho.mqtt.__version__)')"
    echo "python=$("$py" -c 'import platform; print(platform.python_version())')"
    echo "nproc=$(nproc)"
    echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$results/meta.env"
say "N=$N, $PUBLISHERS publishers, Mosquitto on 127.0.0.1:$mq_port, iotgw $commit, load $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- iotgw
gw_pid=""
gw_api=""
gw_client=""

# start_iotgw STAGE DIR: config, check-config, run, /ready, register the devices.
start_iotgw() {
    local stage="$1" dir="$2" cfg api_port i code dev
    mkdir -p "$dir"
    cfg="$dir/gateway.toml"
    api_port="$(free_port)"
    gw_api="127.0.0.1:$api_port"
    gw_client="iotgw-bench-$stage-$$"
    local sync_line=""
    [ -z "$SYNC" ] || sync_line="sqlite_synchronous = \"$SYNC\""
    cat >"$cfg" <<EOF
# bench-e2e stage ($stage): the mqtt provider on the benchmark's Mosquitto, a fresh SQLite file.
[api]
listen = "$gw_api"

[store]
kind = "sqlite"
path = "$dir/iotgw.db"
$sync_line

[routing]
default = "bench"

[providers.bench]
kind = "mqtt"
host = "127.0.0.1"
port = $mq_port
client_id = "$gw_client"
telemetry_topic = "devices/{device_id}/telemetry"
message_id_pointer = "/message_id"

# Fires on every 10th message of a device (temperature above 75); no command.
[rules.hot]
pointer = "/temperature"
op = "gt"
value = 75
alert_type = "Anomaly"
description = "Temperature {value} C above 75 C on {device_id}"

[embedded_broker]
enabled = false

[simulate]
devices = 0
EOF
    if [ -n "$BATCH_WAIT_MS" ]; then
        printf '\n[pipeline]\nbatch_max_wait_ms = %s\n' "$BATCH_WAIT_MS" >>"$cfg"
    fi
    case "$READINGS" in
        1) printf '\n[readings]\nenabled = true\n' >>"$cfg" ;;
        0) printf '\n[readings]\nenabled = false\n' >>"$cfg" ;;
    esac
    if [ "$SINK" = file ]; then
        printf '\n[sinks.archive]\nkind = "file"\npath = "%s"\n' "$dir/alerts.jsonl" >>"$cfg"
    fi
    if ! "$bin" check-config "$cfg" >"$dir/check-config.txt" 2>&1; then
        say "iotgw check-config $cfg refused it:"
        sed 's/^/    /' "$dir/check-config.txt" >&2
        return 1
    fi
    "$bin" run --config "$cfg" >"$dir/iotgw.stdout" 2>"$dir/iotgw.log" &
    gw_pid=$!
    track "$gw_pid"
    for ((i = 0; ; i++)); do
        code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' "http://$gw_api/ready" || true)"
        [ "$code" != 200 ] || break
        if ! kill -0 "$gw_pid" 2>/dev/null; then
            say "iotgw exited before /ready; its log ends with:"
            tail -5 "$dir/iotgw.log" >&2
            return 1
        fi
        if [ "$i" -ge $((READY_TIMEOUT * 20)) ]; then
            say "timeout: iotgw /ready is $code after ${READY_TIMEOUT} s"
            return 124
        fi
        sleep 0.05
    done
    for dev in "${devices[@]}"; do
        code="$(curl -s -m 5 -o "$dir/register-$dev.json" -w '%{http_code}' \
            -H 'content-type: application/json' \
            -d "{\"msdyn_deviceid\": \"$dev\"}" "http://$gw_api/api/v1/devices" || true)"
        if [ "$code" != 201 ]; then
            say "registering $dev answered $code: $(head -c 300 "$dir/register-$dev.json" 2>/dev/null)"
            return 1
        fi
    done
}

# Scrapes /metrics into DIR/metrics.txt and RESULT (JSON).
scrape_metrics() {
    local dir="$1" out="$2"
    curl -s -m 5 "http://$gw_api/metrics" >"$dir/metrics.txt" || true
    "$py" "$bench/analyze.py" metrics --file "$dir/metrics.txt" >"$out" || true
}

# Drains and stops iotgw, then removes its persistent session from the broker (a clean
# start with the same client id), so later stages do not queue messages for it.
stop_iotgw() {
    if [ -n "$gw_pid" ]; then
        stop_pid "$gw_pid" 25
        untrack "$gw_pid"
        gw_pid=""
    fi
    timeout 10 mosquitto_sub -h 127.0.0.1 -p "$mq_port" -V mqttv5 -i "$gw_client" \
        -t bench/none -E >/dev/null 2>&1 || say "note: could not clear iotgw's session $gw_client"
}

# ---------------------------------------------------------------- stages
stage_a() {
    local rc=0
    "${bounded[@]}" "$py" "$bench/drive.py" ceiling --port "$mq_port" --files "${files[@]}" --n "$N" \
        --sub-output "$work/a-sub.out" --log "$work/a-clients.log" --timeout "$STAGE_TIMEOUT" \
        >"$results/a.json" &
    bg_wait $! || rc=$?
    set_status a "$rc" "$(jget "$results/a.json" error)"
    report a ceiling msgs_per_s
}

stage_b() {
    local dir="$work/b" rc=0
    start_iotgw b "$dir" || rc=$?
    if [ "$rc" -ne 0 ]; then
        set_status b "$rc" "iotgw did not start"
        stop_iotgw
        return
    fi
    "${bounded[@]}" "$py" "$bench/drive.py" iotgw --port "$mq_port" --files "${files[@]}" --n "$N" \
        --metrics-url "http://$gw_api/metrics" --watch-pid "$gw_pid" \
        --log "$dir/clients.log" --timeout "$STAGE_TIMEOUT" >"$results/b.json" &
    bg_wait $! || rc=$?
    set_status b "$rc" "$(jget "$results/b.json" error)"
    scrape_metrics "$dir" "$results/b.metrics.json"
    stop_iotgw
    "$py" "$bench/analyze.py" iotgw-db --db "$dir/iotgw.db" >"$results/b.db.json" || true
    report b iotgw msgs_per_s
}

stage_c() {
    local dir="$work/c" rc=0 peer_pid i
    mkdir -p "$dir"
    (cd "$bench" && exec timeout -k 5 "$((STAGE_TIMEOUT + 90))" "$py" naive_peer.py --port "$mq_port" --db "$dir/peer.db" --n "$N" \
        --ready "$dir/ready" --done "$dir/done.json" --client-id "bench-naive-peer-$$" \
        --timeout "$((STAGE_TIMEOUT + 30))") >"$dir/peer.out" 2>"$dir/peer.log" &
    peer_pid=$!
    track "$peer_pid"
    for ((i = 0; ; i++)); do
        [ ! -e "$dir/ready" ] || break
        if ! kill -0 "$peer_pid" 2>/dev/null || [ "$i" -ge 300 ]; then
            say "the naive peer did not subscribe within 15 s: $(tail -3 "$dir/peer.log")"
            set_status c 1 "naive peer did not start"
            stop_pid "$peer_pid" 3
            untrack "$peer_pid"
            return
        fi
        sleep 0.05
    done
    "${bounded[@]}" "$py" "$bench/drive.py" peer --port "$mq_port" --files "${files[@]}" --n "$N" \
        --done "$dir/done.json" --watch-pid "$peer_pid" --log "$dir/clients.log" \
        --timeout "$STAGE_TIMEOUT" >"$results/c.json" &
    bg_wait $! || rc=$?
    set_status c "$rc" "$(jget "$results/c.json" error)"
    stop_pid "$peer_pid" 10
    untrack "$peer_pid"
    "$py" "$bench/analyze.py" peer-db --db "$dir/peer.db" >"$results/c.db.json" || true
    report c "naive peer" msgs_per_s
}

# The reference of (d): the same publishers and load to a plain subscriber, sent_us ->
# the time mosquitto_sub printed the message (%U, Unix time with nanoseconds).
stage_d_reference() {
    local dir="$work/d0" rc=0 sub_pid i want lines
    mkdir -p "$dir"
    mosquitto_sub -h 127.0.0.1 -p "$mq_port" -q 1 -i "bench-d0-sub-$$" -t 'devices/+/telemetry' \
        -F '%U %p' >"$dir/sub.out" 2>"$dir/sub.log" &
    sub_pid=$!
    track "$sub_pid"
    # Subscribed once a warm-up message comes back (bounded: 10 s).
    for ((i = 0; i < 200; i++)); do
        mosquitto_pub -h 127.0.0.1 -p "$mq_port" -q 1 -t devices/warmup/telemetry -m '{"warmup":1}'
        [ ! -s "$dir/sub.out" ] || break
        sleep 0.05
    done
    if [ ! -s "$dir/sub.out" ]; then
        say "(d) reference: mosquitto_sub did not subscribe within 10 s"
        stop_pid "$sub_pid" 3
        untrack "$sub_pid"
        return
    fi
    (cd "$bench" && exec timeout -k 10 "$((STAGE_TIMEOUT + DURATION * 20 + 60))" "$py" rate_pub.py --port "$mq_port" --devices "$PUBLISHERS" \
        --rate "$RATE" --duration "$DURATION" --procs "$LAT_PROCS" --prefix d0 \
        --timeout "$STAGE_TIMEOUT") >"$results/d0.pub.json" 2>"$dir/rate_pub.log" &
    bg_wait $! || rc=$?
    # Every message printed (bounded: STAGE_TIMEOUT), then the subscriber is stopped.
    want=$((RATE * DURATION))
    for ((i = 0; rc == 0 && i < STAGE_TIMEOUT * 20; i++)); do
        lines="$(grep -c '"message_id":"d0-' "$dir/sub.out" || true)"
        [ "$lines" -lt "$want" ] || break
        sleep 0.05
    done
    stop_pid "$sub_pid" 3
    untrack "$sub_pid"
    "$py" "$bench/analyze.py" sub-latency --file "$dir/sub.out" --prefix d0- >"$results/d0.json" || true
}

stage_d() {
    local dir="$work/d" rc=0 messages
    stage_d_reference
    start_iotgw d "$dir" || rc=$?
    if [ "$rc" -ne 0 ]; then
        set_status d "$rc" "iotgw did not start"
        stop_iotgw
        return
    fi
    (cd "$bench" && exec timeout -k 10 "$((STAGE_TIMEOUT + DURATION * 20 + 60))" "$py" rate_pub.py --port "$mq_port" --devices "$PUBLISHERS" \
        --rate "$RATE" --duration "$DURATION" --procs "$LAT_PROCS" \
        --metrics-url "http://$gw_api/metrics" --timeout "$STAGE_TIMEOUT") \
        >"$results/d.pub.json" 2>"$dir/rate_pub.log" &
    bg_wait $! || rc=$?
    if [ "$rc" -eq 0 ]; then
        messages="$(jget "$results/d.pub.json" messages)"
        "${bounded[@]}" "$py" "$bench/drive.py" wait-acked --metrics-url "http://$gw_api/metrics" \
            --target "$messages" --watch-pid "$gw_pid" --timeout "$STAGE_TIMEOUT" \
            >"$results/d.wait.json" &
        bg_wait $! || rc=$?
        set_status d "$rc" "$(jget "$results/d.wait.json" error)"
    else
        set_status d "$rc" "publisher: $(jget "$results/d.pub.json" error)"
    fi
    scrape_metrics "$dir" "$results/d.metrics.json"
    stop_iotgw
    "$py" "$bench/analyze.py" iotgw-db --db "$dir/iotgw.db" --latency >"$results/d.db.json" || true
    report d "latency stage, achieved publish rate" achieved_rate
}

for stage in a b c d; do
    case "$STAGES" in *"$stage"*) "stage_$stage" ;; esac
done

echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$results/meta.env"
stop_pid "$mq_pid" 5
untrack "$mq_pid"

"$py" "$bench/table.py" "$results"
[ "$failed" -eq 0 ] || exit 1
