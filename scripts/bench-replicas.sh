#!/usr/bin/env bash
# Scale-out benchmark, side by side on one machine in one run: committed QoS 1 messages per
# second through 1, 2 and 3 iotgw replicas sharing one PostgreSQL, next to
#
#   (ref)     Mosquitto alone: PUBLISHERS `mosquitto_pub -q 1 -l` -> one `mosquitto_sub -q 1`
#   (sqlite)  one iotgw on SQLite (the single-gateway deployment)
#   (pg-R)    R replicas of the same release binary on one config file, store PostgreSQL
#             (a fresh database per stage), the mqtt provider in the shared subscription
#             group "iotgw" ($share/iotgw/devices/+/telemetry): the broker splits the
#             telemetry between them; the clock stops when the SUM of
#             iotgw_events_acked_total over the replicas reaches N
#
# Broker and database run in Docker (eclipse-mosquitto:2, postgres:15, local images): a
# durable PostgreSQL (fsync on, the server's defaults apart from max_connections=200) and a
# Mosquitto with persistence on. Both are removed on exit. `--help` lists the knobs.
#
# Needs: docker with the two images, mosquitto-clients (scripts/install-test-deps.sh is run
# when mosquitto_pub is missing), python3 (standard library only), curl,
# target/release/iotgw (built with `cargo build --release -p iotgw` when missing).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-replicas.sh [--help]

Committed msg/s through 1, 2 and 3 iotgw replicas on one PostgreSQL, measured in one run
beside the broker's own rate and a single iotgw on SQLite, as ratios; prints one table.

Stages, in this order, on the same Mosquitto, publishers and messages:
  ref      the same publishers to one plain `mosquitto_sub -q 1` counting to N: what the
           broker, the publishers and one subscriber reach on this machine
  sqlite   one iotgw, store SQLite, the mqtt provider with shared_group = "iotgw",
           unknown_devices = "auto_register", one rule firing on the 10 % hot readings
           (temperature > 75), no sinks; the clock stops when iotgw_events_acked_total
           (GET /metrics) reaches N, i.e. every message is committed and PUBACKed
  pg-R     for each R in REPLICAS: a fresh database (CREATE DATABASE through
           `docker exec psql`), R replicas started on one config file, each with
           IOTGW_REPLICA__ID=replica-K (MQTT client id iotgw-replica-K) and its own API
           port (IOTGW_API__LISTEN); once every replica's /ready is 200 the N messages are
           published; the clock stops when the sum of iotgw_events_acked_total over the
           replicas reaches N. Then: SELECT count(*) FROM alerts must equal the hot readings
           (fewer: lost, more than distinct tokens: duplicates).

Each message is published exactly once per stage; messages are generated once
(scripts/bench/gen_payloads.py, one file per device, ~126 bytes). The clock starts just
before the publishers start (scripts/bench/drive.py).

Environment (defaults in brackets):
  N              messages per stage                                             [50000]
  PUBLISHERS     mosquitto_pub -q 1 -l processes, one device each               [10]
  REPLICAS       the replica counts to measure on PostgreSQL, in order          ["1 2 3"]
  POOL_SIZE      [store.postgres] pool_size of each replica                     [10]
  STAGE_TIMEOUT  seconds one stage may take before it is reported as timeout    [300]
  READY_TIMEOUT  seconds a replica may take to answer 200 on /ready             [60]
  KEEP           1: keep the temp directory (configs, replica logs, results)     [0]
  REBUILD        1: run `cargo build --release -p iotgw` even if it exists      [0]

Reading the result: on a machine with few cores, the replicas, PostgreSQL, Mosquitto and
the publishers share the same cores, so more replicas cannot add CPU; there the figures
show what coordination through one database costs, not the headroom of scale-out, which
needs replicas on machines of their own. The table prints nproc and the load average.

The temp directory is kept when a stage fails. Exit status: 0 when every stage ran to
completion, 1 otherwise (a stage that timed out shows "timeout" in the table), 64 on bad
arguments or settings.
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) printf 'bench-replicas: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$repo/scripts/bench"
cd "$repo"

N="${N:-50000}"
PUBLISHERS="${PUBLISHERS:-10}"
REPLICAS="${REPLICAS:-1 2 3}"
POOL_SIZE="${POOL_SIZE:-10}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-300}"
READY_TIMEOUT="${READY_TIMEOUT:-60}"
KEEP="${KEEP:-0}"
REBUILD="${REBUILD:-0}"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/iotgw"
py=python3
label="iotgw-bench=replicas"
pg_user=iotgw
pg_password=iotgw-bench

# The helpers import each other from scripts/bench: leave no __pycache__ in the tree.
export PYTHONDONTWRITEBYTECODE=1

say() { printf '[bench-replicas] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

for var in N PUBLISHERS POOL_SIZE STAGE_TIMEOUT READY_TIMEOUT; do
    if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
        say "$var must be a whole number of at least 1, not '${!var}'"
        exit 64
    fi
done
if [ "$PUBLISHERS" -gt 99 ]; then say "PUBLISHERS must be at most 99"; exit 64; fi
read -r -a replica_counts <<<"$REPLICAS"
[ "${#replica_counts[@]}" -gt 0 ] || { say "REPLICAS is empty"; exit 64; }
for r in "${replica_counts[@]}"; do
    if ! [[ "$r" =~ ^[1-9][0-9]?$ ]]; then say "REPLICAS takes counts 1-99, not '$r'"; exit 64; fi
done

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
containers=()
cleanup() {
    local rc=$? p c
    trap - EXIT INT TERM
    for p in "${tracked[@]+"${tracked[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${tracked[@]+"${tracked[@]}"}"; do stop_pid "$p" 3; done
    for c in "${containers[@]+"${containers[@]}"}"; do
        if [ -n "$work" ] && [ -d "$work" ]; then
            docker logs "$c" >"$work/$c.log" 2>&1 || true
        fi
        docker rm -f -v "$c" >/dev/null 2>&1 || say "note: could not remove container $c"
    done
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "$KEEP" = 1 ] || [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
            say "kept $work (configs, logs, results)"
        else
            rm -rf "$work"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bounded=(timeout -k 10 "$((STAGE_TIMEOUT + 60))")

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

jget() { # jget FILE KEY -> the value, "" when missing
    "$py" -c 'import json, sys
try:
    v = json.load(open(sys.argv[1])).get(sys.argv[2])
except (OSError, ValueError):
    v = None
print("" if v is None else v)' "$1" "$2"
}

set_status() {
    local stage="$1" rc="$2" what="${3:-}"
    case "$rc" in
        0) echo ok ;;
        124) echo "timeout${what:+ ($what)}" ;;
        *) echo "failed${what:+: $what} (exit $rc; logs in the kept temp dir)" ;;
    esac >"$results/$stage.status"
    [ "$rc" -eq 0 ] || failed=1
}

report() {
    local stage="$1" st v
    st="$(cat "$results/$stage.status")"
    v="$(jget "$results/$stage.json" msgs_per_s)"
    if [ "$st" = ok ] && [ -n "$v" ]; then say "($stage) ${v%%.*} msg/s"; else say "($stage) $st"; fi
}

load_now() { cut -d' ' -f1-3 /proc/loadavg; }

# cpu_snapshot FILE: CPU time used so far by the gateways of the stage (utime + stime, clock
# ticks), the PostgreSQL and Mosquitto containers (ns), and the whole machine (busy and
# total ticks from /proc/stat), as JSON; the table turns two of them into CPU seconds.
cpu_snapshot() {
    local gw=0 p f pg=null mq=null
    for p in "${gw_pids[@]+"${gw_pids[@]}"}"; do
        f="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null)" || continue
        read -r -a f <<<"$f"
        gw=$((gw + f[11] + f[12]))
    done
    [ ! -r "$cg_pg" ] || pg="$(cat "$cg_pg")"
    [ ! -r "$cg_mq" ] || mq="$(cat "$cg_mq")"
    awk -v gw="$gw" -v pg="$pg" -v mq="$mq" -v hz="$(getconf CLK_TCK)" '/^cpu / {
        busy = $2 + $3 + $4 + $7 + $8 + $9; total = busy + $5 + $6
        printf "{\"gw_ticks\": %d, \"pg_ns\": %s, \"mq_ns\": %s, \"busy_ticks\": %d, \"total_ticks\": %d, \"hz\": %d}\n", gw, pg, mq, busy, total, hz
    }' /proc/stat >"$1"
}

# ---------------------------------------------------------------- set-up
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    say "installing mosquitto-clients (scripts/install-test-deps.sh)"
    bash "$repo/scripts/install-test-deps.sh" >/dev/null
fi
for tool in docker mosquitto_pub mosquitto_sub curl "$py"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH"
done
for image in postgres:15 eclipse-mosquitto:2; do
    docker image inspect "$image" >/dev/null 2>&1 || die "docker image $image is not present locally"
done

if [ ! -x "$bin" ] || [ "$REBUILD" = 1 ]; then
    say "building: cargo build --release -p iotgw (waits if another build holds the cargo lock)"
    cargo build --release -p iotgw || die "cargo build --release -p iotgw failed"
fi
[ -x "$bin" ] || die "$bin is missing after the build"

work="$(mktemp -d "${TMPDIR:-/tmp}/iotgw-bench-replicas.XXXXXX")"
chmod 755 "$work"
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
load_before="$(load_now)"

# ---------------------------------------------------------------- payloads
"$py" "$bench/gen_payloads.py" --n "$N" --devices "$PUBLISHERS" --out "$work/payloads" \
    >"$work/payloads.json"
files=("$work"/payloads/*.jsonl)
alerting="$(jget "$work/payloads.json" alerting)"
payload_bytes="$(( $(jget "$work/payloads.json" bytes) / N ))"

# ---------------------------------------------------------------- containers
run_id="$$-$(date +%s)"

# container_port NAME PORT -> the loopback port Docker published it on
container_port() {
    docker port "$1" "$2/tcp" | sed -n 's/^127\.0\.0\.1:\([0-9]*\)$/\1/p' | head -1
}

cat >"$work/mosquitto.conf" <<'EOF'
# bench-replicas: anonymous, persistence on, unlimited queue (Mosquitto's default of 1,000
# queued messages per client would drop QoS 1 messages for any slow consumer).
listener 1883
allow_anonymous true
persistence true
persistence_location /mosquitto/data/
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
EOF
chmod 644 "$work/mosquitto.conf"
mq_name="iotgw-bench-mosquitto-$run_id"
docker run -d --name "$mq_name" --label "$label" -p 127.0.0.1::1883 \
    -v "$work/mosquitto.conf:/bench/mosquitto.conf:ro" \
    eclipse-mosquitto:2 mosquitto -c /bench/mosquitto.conf >/dev/null ||
    die "could not start eclipse-mosquitto:2"
containers+=("$mq_name")
mq_port="$(container_port "$mq_name" 1883)"
[ -n "$mq_port" ] || die "no loopback port published for Mosquitto"

pg_name="iotgw-bench-postgres-$run_id"
docker run -d --name "$pg_name" --label "$label" -p 127.0.0.1::5432 \
    -e POSTGRES_USER="$pg_user" -e POSTGRES_PASSWORD="$pg_password" -e POSTGRES_DB=iotgw \
    postgres:15 postgres -c max_connections=200 >/dev/null || die "could not start postgres:15"
containers+=("$pg_name")
pg_port="$(container_port "$pg_name" 5432)"
# CPU time of each container (cgroup v1 cpuacct; "-" in the table where it is not there).
cg_pg="/sys/fs/cgroup/cpuacct/docker/$(docker inspect -f '{{.Id}}' "$pg_name")/cpuacct.usage"
cg_mq="/sys/fs/cgroup/cpuacct/docker/$(docker inspect -f '{{.Id}}' "$mq_name")/cpuacct.usage"
[ -n "$pg_port" ] || die "no loopback port published for PostgreSQL"

# psql inside the container, over TCP (the image's init phase runs a socket-only server
# first, so a TCP answer means the real server is up).
psql_c() { # psql_c DATABASE SQL
    docker exec "$pg_name" psql -h 127.0.0.1 -U "$pg_user" -d "$1" -v ON_ERROR_STOP=1 -tAc "$2"
}

for ((i = 0; ; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$mq_port") 2>/dev/null &&
        timeout 5 mosquitto_pub -h 127.0.0.1 -p "$mq_port" -q 1 -t bench/hello -m hi 2>/dev/null; then
        break
    fi
    [ "$i" -lt 100 ] || die "timeout: Mosquitto does not answer on 127.0.0.1:$mq_port after 30 s"
    sleep 0.3
done
for ((i = 0; ; i++)); do
    if psql_c iotgw 'select 1' >/dev/null 2>&1; then break; fi
    [ "$i" -lt 200 ] || die "timeout: PostgreSQL does not answer after 60 s: $(docker logs --tail 5 "$pg_name" 2>&1)"
    sleep 0.3
done

{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "n=$N"
    echo "publishers=$PUBLISHERS"
    echo "alerting=$alerting"
    echo "payload_bytes=$payload_bytes"
    echo "replicas=${replica_counts[*]}"
    echo "pool_size=$POOL_SIZE"
    echo "commit=$commit"
    echo "binary_built=$(date -u -r "$bin" '+%Y-%m-%d %H:%M UTC')"
    echo "binary_stale=$binary_stale"
    echo "mosquitto=$(docker exec "$mq_name" mosquitto -h 2>&1 | head -1 | sed 's/^mosquitto version/Mosquitto/') (eclipse-mosquitto:2, persistence on)"
    echo "postgres=$(psql_c iotgw 'show server_version' | sed 's/ .*//') (postgres:15, fsync=$(psql_c iotgw 'show fsync' | tr -d '[:space:]'), synchronous_commit=$(psql_c iotgw 'show synchronous_commit' | tr -d '[:space:]'))"
    echo "nproc=$(nproc)"
    echo "load_before=$load_before"
} >"$results/meta.env"
say "N=$N, $PUBLISHERS publishers, Mosquitto on 127.0.0.1:$mq_port, PostgreSQL on 127.0.0.1:$pg_port, iotgw $commit, load $(load_now)"

# ---------------------------------------------------------------- iotgw
# write_config FILE STORE_TOML: the config every gateway of a stage runs.
write_config() {
    local cfg="$1" store="$2"
    cat >"$cfg" <<EOF
# bench-replicas: the mqtt provider on the benchmark's Mosquitto in the shared group "iotgw".
# Each replica gets its id (IOTGW_REPLICA__ID) and API address (IOTGW_API__LISTEN) from its
# environment, so every replica of a stage runs this one file.
$store

[pipeline]
unknown_devices = "auto_register"

[routing]
default = "bench"

[providers.bench]
kind = "mqtt"
host = "127.0.0.1"
port = $mq_port
client_id = "iotgw"
shared_group = "iotgw"
telemetry_topic = "devices/{device_id}/telemetry"
message_id_pointer = "/message_id"

# Fires on every 10th message of a device (temperature above 75); no command, no sink.
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
}

gw_pids=()
gw_apis=()
gw_ids=()

# start_gateway DIR CONFIG ID: one gateway process; waits for its /ready.
start_gateway() {
    local dir="$1" cfg="$2" id="$3" api i code pid
    api="127.0.0.1:$(free_port)"
    IOTGW_REPLICA__ID="$id" IOTGW_API__LISTEN="$api" \
        "$bin" run --config "$cfg" >"$dir/$id.stdout" 2>"$dir/$id.log" &
    pid=$!
    track "$pid"
    gw_pids+=("$pid")
    gw_apis+=("$api")
    gw_ids+=("$id")
    for ((i = 0; ; i++)); do
        code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' "http://$api/ready" || true)"
        [ "$code" != 200 ] || return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            say "$id exited before /ready; its log ends with:"
            tail -5 "$dir/$id.log" >&2
            return 1
        fi
        if [ "$i" -ge $((READY_TIMEOUT * 20)) ]; then
            say "timeout: $id /ready is $code after ${READY_TIMEOUT} s"
            return 124
        fi
        sleep 0.05
    done
}

# Scrapes every gateway's /metrics into DIR/metrics-<id>.txt and, summarised by
# scripts/bench/analyze.py, RESULTS/<stage>.metrics-<id>.json (received, acked, nacked,
# dead letters, batches of that replica).
scrape_all() {
    local stage="$1" dir="$2" k id
    for k in "${!gw_ids[@]}"; do
        id="${gw_ids[$k]}"
        curl -s -m 5 "http://${gw_apis[$k]}/metrics" >"$dir/metrics-$id.txt" || true
        "$py" "$bench/analyze.py" metrics --file "$dir/metrics-$id.txt" \
            >"$results/$stage.metrics-$id.json" || true
    done
}

# Stops every gateway of the stage (graceful, 25 s), then removes their persistent sessions
# from the broker (a clean start with the same client id), so later stages do not queue
# messages for them.
stop_gateways() {
    local k pid
    for pid in "${gw_pids[@]+"${gw_pids[@]}"}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${gw_pids[@]+"${gw_pids[@]}"}"; do stop_pid "$pid" 25; untrack "$pid"; done
    for k in "${!gw_ids[@]}"; do
        timeout 10 mosquitto_sub -h 127.0.0.1 -p "$mq_port" -V mqttv5 -i "iotgw-${gw_ids[$k]}" \
            -t bench/none -E >/dev/null 2>&1 || say "note: could not clear the session iotgw-${gw_ids[$k]}"
    done
    gw_pids=()
    gw_apis=()
    gw_ids=()
}

# Errors and warnings in the gateways' logs (the log format is JSON or text: grep both).
log_errors() {
    local dir="$1"
    cat "$dir"/*.log 2>/dev/null | grep -ciE '"level":"(ERROR|WARN)"|\b(ERROR|WARN)\b' || true
}

# run_gateway_stage STAGE DIR: publishes N to the running gateways and times it.
run_gateway_stage() {
    local stage="$1" dir="$2" rc=0 k args=()
    for k in "${!gw_ids[@]}"; do
        args+=(--metrics-url "http://${gw_apis[$k]}/metrics" --watch-pid "${gw_pids[$k]}")
    done
    echo "$(load_now)" >"$results/$stage.load"
    cpu_snapshot "$results/$stage.cpu0.json"
    "${bounded[@]}" "$py" "$bench/drive.py" iotgw --port "$mq_port" --files "${files[@]}" --n "$N" \
        "${args[@]}" --log "$dir/clients.log" --timeout "$STAGE_TIMEOUT" >"$results/$stage.json" &
    bg_wait $! || rc=$?
    cpu_snapshot "$results/$stage.cpu1.json"
    set_status "$stage" "$rc" "$(jget "$results/$stage.json" error)"
    # Redeliveries would show as acked beyond N: let them arrive before the scrape.
    sleep 2
    scrape_all "$stage" "$dir"
}

# ---------------------------------------------------------------- stages
stage_ref() {
    local rc=0
    echo "$(load_now)" >"$results/ref.load"
    cpu_snapshot "$results/ref.cpu0.json"
    "${bounded[@]}" "$py" "$bench/drive.py" ceiling --port "$mq_port" --files "${files[@]}" --n "$N" \
        --sub-output "$work/ref-sub.out" --log "$work/ref-clients.log" --timeout "$STAGE_TIMEOUT" \
        >"$results/ref.json" &
    bg_wait $! || rc=$?
    cpu_snapshot "$results/ref.cpu1.json"
    set_status ref "$rc" "$(jget "$results/ref.json" error)"
    report ref
}

stage_sqlite() {
    local dir="$work/sqlite" rc=0
    mkdir -p "$dir"
    write_config "$dir/gateway.toml" "[store]
kind = \"sqlite\"
path = \"$dir/iotgw.db\""
    if ! "$bin" check-config "$dir/gateway.toml" >"$dir/check-config.txt" 2>&1; then
        sed 's/^/    /' "$dir/check-config.txt" >&2
        set_status sqlite 1 "check-config refused the config"
        return
    fi
    start_gateway "$dir" "$dir/gateway.toml" sqlite || rc=$?
    if [ "$rc" -ne 0 ]; then
        set_status sqlite "$rc" "iotgw did not start"
        stop_gateways
        return
    fi
    run_gateway_stage sqlite "$dir"
    stop_gateways
    "$py" "$bench/analyze.py" iotgw-db --db "$dir/iotgw.db" >"$results/sqlite.db.json" || true
    echo "$(log_errors "$dir")" >"$results/sqlite.logerrors"
    report sqlite
}

stage_pg() {
    local r="$1" stage="pg-$1" db="bench_r$1_$$" dir="$work/pg-$1" rc=0 k row
    mkdir -p "$dir"
    if ! psql_c iotgw "CREATE DATABASE $db" >"$dir/createdb.txt" 2>&1; then
        set_status "$stage" 1 "CREATE DATABASE $db: $(tr '\n' ' ' <"$dir/createdb.txt")"
        return
    fi
    write_config "$dir/gateway.toml" "[store]
kind = \"postgres\"

[store.postgres]
url = \"postgres://$pg_user:$pg_password@127.0.0.1:$pg_port/$db\"
pool_size = $POOL_SIZE"
    if ! "$bin" check-config "$dir/gateway.toml" >"$dir/check-config.txt" 2>&1; then
        sed 's/^/    /' "$dir/check-config.txt" >&2
        set_status "$stage" 1 "check-config refused the config"
        return
    fi
    # One after the other: the first one runs the migrations on the empty database.
    for ((k = 1; k <= r; k++)); do
        start_gateway "$dir" "$dir/gateway.toml" "replica-$k" || { rc=$?; break; }
    done
    if [ "$rc" -ne 0 ]; then
        set_status "$stage" "$rc" "a replica did not start"
        stop_gateways
        return
    fi
    run_gateway_stage "$stage" "$dir"
    # acked == committed: the alerts are in the database by now.
    row="$(psql_c "$db" "SELECT count(*), count(DISTINCT alert_token),
        count(DISTINCT alert_data::json->>'message_id'), count(*) FILTER (WHERE parent_alert IS NULL),
        (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM devices) FROM alerts" 2>"$dir/check.err" || true)"
    stop_gateways
    IFS='|' read -r a_all a_tokens a_ids a_primary dead devs <<<"$row"
    printf '{"alerts": %s, "distinct_tokens": %s, "distinct_message_ids": %s, "primary": %s, "dead_letters": %s, "devices": %s}\n' \
        "${a_all:-null}" "${a_tokens:-null}" "${a_ids:-null}" "${a_primary:-null}" "${dead:-null}" "${devs:-null}" \
        >"$results/$stage.db.json"
    echo "$(log_errors "$dir")" >"$results/$stage.logerrors"
    report "$stage"
}

stage_ref
stage_sqlite
for r in "${replica_counts[@]}"; do stage_pg "$r"; done

echo "load_after=$(load_now)" >>"$results/meta.env"
"$py" "$bench/replicas_table.py" "$results"
[ "$failed" -eq 0 ] || exit 1
