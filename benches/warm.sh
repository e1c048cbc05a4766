#!/usr/bin/env bash
# The warm path: reading an image whose layers the store has completed (every span local, every
# file's decompressed copy written), against the same image pulled plainly. The realistic image of
# benches/start.sh (its cached OCI layout in target/bench-start/oci; run that script once first).
# Both are mounted with `podman image mount` (podman 4, the host), so reads go through the same
# overlay a container sees. Per round, interleaved, each after dropping the page cache:
#   big   `cat` of the image's biggest file
#   scan  sha256 of every file of the image
# for: plain (plain pull), pt (the store, FUSE passthrough), nopt (the store, `--no-passthrough`).
# Also the daemons' RSS once complete. Medians (min–max) of REPS rounds.
#
#   usage: [REPS=3] [BIN=target/release/soci-store] [OUT=FILE] benches/warm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${REPS:-3}"
bin="$(realpath "${BIN:-target/release/soci-store}")"
layout="$PWD/target/bench-start/oci"
out="${OUT:-target/bench-start/warm-$(date +%Y%m%d-%H%M%S).tsv}"
[ -x "$bin" ] || { echo "no soci-store binary at $bin (set BIN)" >&2; exit 1; }
[ -d "$layout" ] || { echo "no image at $layout: run benches/start.sh once (it builds it)" >&2; exit 1; }
for c in skopeo docker-registry podman curl python3; do
  command -v "$c" >/dev/null || { echo "missing $c (see ../shared/docs/test-machine.md)" >&2; exit 1; }
done

tmp=$(mktemp -d /var/tmp/soci-warm.XXXXXX)
reg_pid=""; pids=()
pm() {  # pm KIND ARGS… (podman with the graph root of KIND)
  local k="$1"; shift
  local so=()
  [ "$k" != plain ] && so=(--storage-opt "overlay.additionallayerstore=$tmp/$k/store:ref")
  CONTAINERS_CONF="$tmp/containers.conf" podman --root "$tmp/$k/root" --runroot "$tmp/$k/run" \
    --tmpdir "$tmp/$k/tmp" --storage-driver overlay "${so[@]}" "$@"
}
cleanup() {
  set +e
  for k in plain pt nopt; do
    [ -d "$tmp/$k/root" ] && timeout 120 pm "$k" system reset -f >/dev/null 2>&1
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do timeout 20 tail --pid="$p" -f /dev/null 2>/dev/null; done
  awk -v t="$tmp" '$2 ~ "^" t {print $2}' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
  [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reg="127.0.0.1:$port"
cat > "$tmp/reg.yml" <<C
version: 0.1
storage: {filesystem: {rootdirectory: $tmp/reg}}
http: {addr: $reg}
C
env -u AWS_CA_BUNDLE docker-registry serve "$tmp/reg.yml" >"$tmp/reg.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy -q --dest-tls-verify=false "oci:$layout:v1" "docker://$reg/app:v1"
cat > "$tmp/containers.conf" <<C
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=1024:4096"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
C
config() {  # config DIR METRICS_PORT
  cat <<C
artifacts = "$1/artifacts"
state_dir = "$1/state"
local_files = "$1/files"
metrics_address = "127.0.0.1:$2"
[[fetchers]]
type = "registry"
insecure = ["$reg"]
registries_conf = "/nonexistent"
[cache]
type = "tiered"
path = "$1/cache"
C
}
mkdir -p "$tmp/convert"
config "$tmp/convert" 1 > "$tmp/convert.toml"
"$bin" --config "$tmp/convert.toml" convert --quiet "$reg/app:v1" "$reg/app:soci"

metric() { curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {print $2}'; }
declare -A mnt port
port[pt]=9311; port[nopt]=9312
pm plain pull -q --tls-verify=false "$reg/app:v1" >/dev/null
mnt[plain]=$(pm plain image mount "$reg/app:v1")
for k in pt nopt; do
  mkdir -p "$tmp/$k/store"
  config "$tmp/$k" "${port[$k]}" > "$tmp/$k.toml"
  extra=(); [ "$k" = nopt ] && extra=(--no-passthrough)
  "$bin" --config "$tmp/$k.toml" serve "$tmp/$k/store" "${extra[@]}" >"$tmp/$k.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do grep -q " $tmp/$k/store fuse" /proc/self/mounts && break; sleep 0.05; done
  pm "$k" pull -q --tls-verify=false "$reg/app:soci" >/dev/null
  mnt[$k]=$(pm "$k" image mount "$reg/app:soci")
done
# Complete: every served layer's spans fetched and its files copied.
for k in pt nopt; do
  for _ in $(seq 1200); do
    served=$(metric "${port[$k]}" soci_store_layers_served); copied=$(metric "${port[$k]}" soci_store_layers_copied)
    [ "${served:-0}" -gt 0 ] && [ "$copied" = "$served" ] && break
    sleep 0.5
  done
  [ "$copied" = "$served" ] || { echo "$k: $copied of $served layers copied" >&2; exit 1; }
done
big=$(cd "${mnt[plain]}" && find . -xdev -type f -printf '%s %P\n' | sort -n | tail -1 | cut -d' ' -f2-)
echo "biggest file: $big ($(stat -c %s "${mnt[plain]}/$big") bytes)" >&2

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
scan() { (cd "$1" && find . -xdev -type f -print0 | xargs -0 -r sha256sum); }
printf 'round\tkind\tbig_s\tscan_s\n' > "$out"
for r in $(seq "$reps"); do
  for k in plain pt nopt; do
    drop; b=$(secs cat "${mnt[$k]}/$big")
    drop; s=$(secs scan "${mnt[$k]}")
    printf '%s\t%s\t%.3f\t%.3f\n' "$r" "$k" "$b" "$s" >> "$out"
  done
done
# The same bytes everywhere.
for k in pt nopt; do
  cmp -s <(scan "${mnt[plain]}" | sort -k2) <(scan "${mnt[$k]}" | sort -k2) || { echo "$k: files differ from the plain pull" >&2; exit 1; }
done
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
echo "daemon RSS once complete (MiB): pt $(rss "${pids[0]}"), nopt $(rss "${pids[1]}")" >&2
echo "passthrough opens: pt $(metric 9311 soci_store_passthrough_opens_total), nopt $(metric 9312 soci_store_passthrough_opens_total)" >&2
python3 - "$out" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def col(kind, c): return [float(r[c]) for r in rows if r["kind"] == kind]
for c, what in (("big_s", "cat of the biggest file"), ("scan_s", "sha256 of every file")):
    base = statistics.median(col("plain", c))
    for k in ("plain", "pt", "nopt"):
        v = col(k, c); m = statistics.median(v)
        print(f"{what:24} {k:6} {m:7.3f} s ({min(v):.3f}-{max(v):.3f})  speed vs plain {base / m:.2f}x")
PY
echo "rows: $out" >&2
