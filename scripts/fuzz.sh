#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECS seconds each (default 60) on the
# nightly toolchain, installing cargo-fuzz first when it is missing. Not part of CI (it
# needs nightly and minutes per target); record what it prints in FUZZING.md.
#
#   bash scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECS=600 bash scripts/fuzz.sh mqtt_decode
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECS:-60}"
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: a nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (once)"
    cargo +stable install cargo-fuzz --locked
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${secs} s"
    mkdir -p "fuzz/corpus/$t"
    log="$(mktemp)"
    status=0
    cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n 1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)
    echo "fuzz: $t: ${runs:-?} executions in ${secs} s, corpus $corpus inputs, crashes $crashes, exit $status"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
    fi
    rm -f "$log"
done
