#!/usr/bin/env bash
# Longer runs of the mutation tests in tests/fuzz.rs: every target, many seeds, many mutations.
#
#   scripts/fuzz-long.sh [SEEDS] [ITERS] [SECS]
#
# SEEDS: how many seeds (1..SEEDS, default 20); ITERS: mutations per target and seed (default
# 200000); SECS: time budget per target and seed (default 300). Runs at low CPU priority. A
# failure prints the target, seed and iteration (rerun with SOCI_FUZZ_SEED=<seed>) and leaves
# the input in $TMPDIR as soci-fuzz-<target>-<seed>-<iteration>.bin; the script stops there.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20}
iters=${2:-200000}
secs=${3:-300}
nice -n 19 cargo test --release --locked --test fuzz --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for seed in $(seq 1 "$seeds"); do
    echo "== seed $seed"
    if ! SOCI_FUZZ_SEED=$seed SOCI_FUZZ_ITERS=$iters SOCI_FUZZ_SECS=$secs \
        nice -n 19 cargo test --release --locked --test fuzz -- --nocapture --test-threads 1 \
        >"$log" 2>&1; then
        grep -E 'panicked|failed at|left|right' "$log" >&2 || cat "$log" >&2
        echo "seed $seed failed" >&2
        exit 1
    fi
    grep -E 'mutations in' "$log"
done
echo "all $seeds seeds passed"
