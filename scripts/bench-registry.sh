#!/usr/bin/env bash
# Registry at fleet size: how fast `iotgw devices import` registers devices into the store,
# and how much memory the gateway holds once the registry is large.
#
#   stage 1  a fresh gateway (`iotgw run`: embedded broker, mqtt provider in registry-only
#            mode, no simulated devices, no rules, no sinks, SQLite in a temp dir) imports a
#            generated CSV of N devices (default 100,000) through the CLI; the clock runs
#            from the start of the import to its exit; VmRSS of the gateway afterwards
#   stage 2  another fresh gateway imports BIG devices (default 1,000,000); registrations/s
#            over the whole import, VmRSS and VmHWM (peak) of the gateway afterwards, and
#            the database size
#
# Prints one table with nproc, the load average before and after, and the commit.
# Needs: cargo (target/release/iotgw is built with `cargo build --release -p iotgw` when
# missing or when REBUILD=1), awk.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-registry.sh [--help]

Registrations/s of `iotgw devices import` into a fresh gateway's SQLite registry, and the
gateway's resident memory after a large import. Every process started is stopped on exit.

Environment (defaults in brackets):
  N           devices imported in stage 1                                   [100000]
  BIG         devices imported in stage 2 (0 skips it)                      [1000000]
  BATCH_SIZE  --batch-size of the import                                    [500]
  PARALLEL    --parallel of the import (requests in flight)                 [the CLI's default]
  BIN   the iotgw binary                                              [target/release/iotgw]
  REBUILD     1: run `cargo build --release -p iotgw` even if the binary exists [0]
  KEEP        1: keep the temp dir (databases, CSV files, gateway logs)     [0]
EOF
}
[[ "${1:-}" == "--help" || "${1:-}" == "-h" ]] && { usage; exit 0; }

N=${N:-100000}
BIG=${BIG:-1000000}
BATCH_SIZE=${BATCH_SIZE:-500}
PARALLEL=${PARALLEL:-}
REBUILD=${REBUILD:-0}
KEEP=${KEEP:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BIN:-$TARGET/release/iotgw}

if [[ "$REBUILD" == 1 || ! -x "$BIN" ]]; then
    echo "building $BIN (cargo build --release -p iotgw) ..." >&2
    (cd "$ROOT" && cargo build --release -p iotgw >&2)
fi

TMP=$(mktemp -d /tmp/iotgw-bench-registry.XXXXXX)
GW_PID=""
cleanup() {
    if [[ -n "$GW_PID" ]] && kill -0 "$GW_PID" 2>/dev/null; then
        kill -TERM "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
    fi
    if [[ "$KEEP" == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() {
    python3 - <<'PY' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

# A CSV of $2 devices (ids dev-0000001 ...; one of four categories; a site tag) at $1.
make_csv() {
    awk -v n="$2" 'BEGIN {
        print "msdyn_deviceid,msdyn_category,tag.site";
        split("meter pump valve chiller", cat, " ");
        for (i = 1; i <= n; i++) printf "dev-%07d,%s,site-%d\n", i, cat[i % 4 + 1], i % 50;
    }' > "$1"
}

# Starts a fresh gateway in directory $1; sets GW_PID and API.
start_gateway() {
    local dir=$1 api broker
    mkdir -p "$dir"
    api=$(free_port)
    broker=$(free_port)
    cat > "$dir/gw.toml" <<EOF
[api]
listen = "127.0.0.1:$api"
[store]
path = "$dir/iotgw.db"
[embedded_broker]
enabled = true
port = $broker
v311_port = 0
[routing]
default = "local"
[providers.local]
kind = "mqtt"
port = $broker
client_id = "iotgw-bench-registry"
shared_group = ""
EOF
    (cd "$dir" && IOTGW_LOG=warn exec "$BIN" run --config gw.toml) 2> "$dir/gateway.log" &
    GW_PID=$!
    API="http://127.0.0.1:$api"
    for _ in $(seq 1 300); do
        if "$BIN" healthcheck --url "$API/live" --timeout-ms 500 > /dev/null 2>&1; then return 0; fi
        kill -0 "$GW_PID" 2>/dev/null || { cat "$dir/gateway.log" >&2; echo "iotgw run exited" >&2; exit 1; }
        sleep 0.1
    done
    echo "the gateway did not answer /live within 30 s" >&2
    exit 1
}

stop_gateway() {
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=""
}

kb() { awk -v k="$1" '/^'"$1"':/ {print $2}' "/proc/$GW_PID/status"; }

# Imports $2 (CSV) into the gateway at $API; prints "seconds registered".
timed_import() {
    local dir=$1 csv=$2 t0 t1 out
    t0=$(date +%s.%N)
    out=$("$BIN" devices import --url "$API" --batch-size "$BATCH_SIZE" ${PARALLEL:+--parallel "$PARALLEL"} "$csv" 2> "$dir/import.err") || {
        echo "$out" >&2; cat "$dir/import.err" >&2; echo "the import failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$out" > "$dir/import.out"
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') $(awk '$1 == "registered" {print $2}' "$dir/import.out")"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -qv '^??' && echo " (with uncommitted changes)" || true)

echo "stage 1: $N devices ..." >&2
make_csv "$TMP/fleet-$N.csv" "$N"
start_gateway "$TMP/stage1"
read -r S1_SECS S1_REG < <(timed_import "$TMP/stage1" "$TMP/fleet-$N.csv")
S1_RSS=$(kb VmRSS)
stop_gateway
[[ "$S1_REG" == "$N" ]] || { echo "stage 1 registered $S1_REG of $N" >&2; exit 1; }

if [[ "$BIG" -gt 0 ]]; then
    echo "stage 2: $BIG devices ..." >&2
    make_csv "$TMP/fleet-$BIG.csv" "$BIG"
    start_gateway "$TMP/stage2"
    RSS_IDLE=$(kb VmRSS)
    read -r S2_SECS S2_REG < <(timed_import "$TMP/stage2" "$TMP/fleet-$BIG.csv")
    S2_RSS=$(kb VmRSS)
    S2_HWM=$(kb VmHWM)
    S2_DB=$(du -sk "$TMP/stage2" | awk '{print $1}')
    stop_gateway
    [[ "$S2_REG" == "$BIG" ]] || { echo "stage 2 registered $S2_REG of $BIG" >&2; exit 1; }
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

rate() { awk -v n="$1" -v s="$2" 'BEGIN {printf "%.0f", n / s}'; }
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
echo
echo "| what | value |"
echo "|---|---|"
echo "| commit | $COMMIT$DIRTY |"
echo "| nproc | $(nproc) |"
echo "| load average before / after | $LOAD_BEFORE / $LOAD_AFTER |"
echo "| batch size, requests in flight | $BATCH_SIZE, ${PARALLEL:-default} |"
echo "| $N devices: import time | ${S1_SECS} s |"
echo "| $N devices: registrations/s | $(rate "$N" "$S1_SECS") |"
echo "| gateway VmRSS after $N | $(mb "$S1_RSS") MB |"
if [[ "$BIG" -gt 0 ]]; then
    echo "| $BIG devices: import time | ${S2_SECS} s |"
    echo "| $BIG devices: registrations/s | $(rate "$BIG" "$S2_SECS") |"
    echo "| gateway VmRSS idle / after $BIG | $(mb "$RSS_IDLE") MB / $(mb "$S2_RSS") MB |"
    echo "| gateway VmHWM (peak) during $BIG | $(mb "$S2_HWM") MB |"
    echo "| database directory after $BIG | $(mb "$S2_DB") MB |"
fi
