#!/usr/bin/env bash
# The whole test suite (what CI runs after installing packages; see README).
set -euo pipefail
cd "$(dirname "$0")"
export SOCI_FIXTURES="${SOCI_FIXTURES:-$PWD/../shared/fixtures/upstream-ztoc}"
cargo test --release --locked
