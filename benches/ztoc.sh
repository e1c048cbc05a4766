#!/usr/bin/env bash
# Makes a layer of real files (a debootstrap tree with python3 and perl, as a container image
# layer would hold) and runs the zTOC engine benchmark on it. Results go to docs/benchmarks.md.
#   usage: benches/ztoc.sh [WORKDIR]      (default: target/bench; the tree is kept between runs)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/bench}"
mkdir -p "$work"
layer="$work/debootstrap-layer.tar.gz"
if [ ! -s "$layer" ]; then
  if [ ! -x "$work/root/usr/bin/python3" ]; then
    command -v debootstrap >/dev/null || apt-get install -y debootstrap
    debootstrap --variant=minbase --include=python3,perl bookworm "$work/root" \
      "$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  tar --sort=name --numeric-owner --xattrs -C "$work/root" -cf - . | gzip -6 -n > "$layer.tmp"
  mv "$layer.tmp" "$layer"
fi
command -v /usr/bin/time >/dev/null || apt-get install -y time
BENCH_LAYER="$layer" cargo bench --bench ztoc
