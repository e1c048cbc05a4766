#!/usr/bin/env bash
# Fetch/cache benchmark: a local docker-registry, curl as the baseline. Results: docs/benchmarks.md.
#   usage: benches/fetch.sh            (BENCH_BLOB=FILE to use a real layer instead of 256 MB random)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker-registry >/dev/null || apt-get install -y docker-registry
command -v curl >/dev/null || apt-get install -y curl
cargo bench --bench fetch
