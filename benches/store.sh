#!/usr/bin/env bash
# The podman store benchmark (docs/benchmarks.md): time from `podman run` to a ready line,
# lazily through the store against a plain pull + run, on a 100 Mbit/s link (tbf on the loopback
# of a private network namespace, which holds the registry, the store and podman); bytes fetched
# for the lazy start; warm sequential read throughput of a 500 MB file through the mount against
# local disk; daemon RSS. Medians of REPS (default 3) alternating runs.
#   usage: [REPS=3] [SPAN_SIZE=SIZE] [BACKGROUND=1] benches/store.sh [WORKDIR]
#   (SPAN_SIZE unset: convert's default)
#   (BACKGROUND=1: lazy runs keep the background fetcher on; "bytes fetched" then includes it)
#   (shares the debootstrap tree with benches/ztoc.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/bench}"
reps="${REPS:-3}"
root="$work/root"
if [ ! -x "$root/usr/bin/python3" ]; then
  command -v debootstrap >/dev/null || apt-get install -y debootstrap
  debootstrap --variant=minbase --include=python3,perl bookworm "$root" "$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
cargo build --release --quiet
bin="$PWD/target/release/soci-store"
tmp=$(mktemp -d /var/tmp/soci-bench.XXXXXX)
ns=soci-bench-$$
# nsenter enters only the network namespace (ip netns exec would also remount /sys, hiding
# the cgroup mounts podman needs, and give FUSE mounts their own mount namespace).
in_ns() { nsenter --net="/var/run/netns/$ns" "$@"; }
pids=()
cleanup() {
  # Background jobs run through nsenter in subshells: stop the real processes by their command line.
  pkill -TERM -f -- "serve $tmp/mnt" 2>/dev/null || true
  pkill -TERM -f -- "$tmp/reg.yml" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  grep -o "$tmp[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$ns"
in_ns ip link set lo up
port=5000
cat > "$tmp/reg.yml" <<Y
version: 0.1
log: {level: info, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $tmp/data}}
http: {addr: 127.0.0.1:$port}
Y
in_ns env -u AWS_CA_BUNDLE docker-registry serve "$tmp/reg.yml" >"$tmp/reg.log" 2>&1 &
pids+=($!)
until in_ns curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do sleep 0.1; done

# The image: the debootstrap tree (python3, perl) as two gzip layers, as an OCI layout.
mk_image() {  # mk_image LAYOUT TAR...
  python3 - "$@" <<'PY'
import hashlib, json, subprocess, sys
layout, tars = sys.argv[1], sys.argv[2:]
import os; os.makedirs(f"{layout}/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest(); open(f"{layout}/blobs/sha256/{d}", "wb").write(data); return "sha256:" + d, len(data)
layers, diffs = [], []
for t in tars:
    diffs.append("sha256:" + hashlib.sha256(open(t, "rb").read()).hexdigest())
    d, n = put(subprocess.run(["gzip", "-6", "-n", "-c", t], capture_output=True, check=True).stdout)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
cd, cn = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs},
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}}).encode())
md, mn = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn}, "layers": layers}).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{layout}/index.json", "w"))
open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
print(sum(l["size"] for l in layers))
PY
}
tar --numeric-owner --sort=name -C "$root" -cf "$tmp/l1.tar" ./usr
tar --numeric-owner --sort=name -C "$root" --exclude=./usr -cf "$tmp/l2.tar" .
image_bytes=$(mk_image "$tmp/app" "$tmp/l1.tar" "$tmp/l2.tar")
mkdir -p "$tmp/bigroot"; head -c 500000000 /dev/urandom > "$tmp/bigroot/big.bin"
tar -C "$tmp/bigroot" -cf "$tmp/big.tar" .
mk_image "$tmp/big" "$tmp/big.tar" >/dev/null
rm -f "$tmp"/*.tar
in_ns skopeo copy -q --dest-tls-verify=false "oci:$tmp/app:v1" "docker://127.0.0.1:$port/app:v1"
in_ns skopeo copy -q --dest-tls-verify=false "oci:$tmp/big:v1" "docker://127.0.0.1:$port/big:v1"
cat > "$tmp/config.toml" <<C
artifacts = "$tmp/artifacts"
local_files = "$tmp/files"
metrics_address = "127.0.0.1:9300"
[[fetchers]]
type = "registry"
insecure = ["127.0.0.1:$port"]
registries_conf = "/nonexistent"
[cache]
type = "tiered"
memory_bytes = "256MiB"
path = "$tmp/cache"
disk_bytes = "4GiB"
C
span_args=()
[ -n "${SPAN_SIZE:-}" ] && span_args=(--span-size "$SPAN_SIZE")
in_ns "$bin" --config "$tmp/config.toml" convert --quiet "${span_args[@]}" "127.0.0.1:$port/app:v1" "127.0.0.1:$port/app:soci"
# The zTOCs are the artifact store's big blobs (index manifests are a few hundred bytes).
ztoc_bytes=$(find "$tmp/artifacts" -type f -size +8k -printf '%s\n' | awk '{s+=$1} END {print s+0}')
in_ns "$bin" --config "$tmp/config.toml" convert --quiet "127.0.0.1:$port/big:v1" "127.0.0.1:$port/big:soci"

cat > "$tmp/containers.conf" <<C
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=1024:4096"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
C
pm() {  # pm GRAPHDIR [--storage-opt …] ARGS…
  local g="$1"; shift
  in_ns env CONTAINERS_CONF="$tmp/containers.conf" podman --root "$g/root" --runroot "$g/run" --storage-driver overlay "$@"
}
reset_graph() { pm "$1" system reset -f >/dev/null 2>&1 || true; grep -o "$1[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true; rm -rf "$1"; }
now() { date +%s.%N; }
ready_cmd=(python3 -c 'import json, sqlite3; print("ready")')

# The shaped link: 100 Mbit/s on the namespace's loopback.
in_ns tc qdisc add dev lo root tbf rate 100mbit burst 256kb latency 100ms

plain=(); lazy=(); fetched=(); rss_idle=""; rss_peak=""
for i in $(seq "$reps"); do
  g="$tmp/g-plain"; reset_graph "$g"
  t0=$(now)
  out=$(pm "$g" run --rm --tls-verify=false "127.0.0.1:$port/app:v1" "${ready_cmd[@]}")
  t1=$(now); [ "$out" = ready ] || { echo "plain run printed: $out"; exit 1; }
  plain+=("$(echo "$t1 - $t0" | bc)")
  reset_graph "$g"

  # A fresh store (empty cache and artifacts) for every lazy run.
  rm -rf "$tmp/cache" "$tmp/artifacts"; mkdir -p "$tmp/mnt"
  bg=(--no-background-fetch); [ "${BACKGROUND:-0}" = 1 ] && bg=()
  in_ns "$bin" --config "$tmp/config.toml" serve "$tmp/mnt" "${bg[@]}" >"$tmp/serve.log" 2>&1 &
  spid=$!; pids+=($spid)
  until grep -q " $tmp/mnt " /proc/self/mounts; do sleep 0.05; done
  dpid=$(pgrep -n -f -- "serve $tmp/mnt")
  rss_idle=$(awk '/VmRSS/ {print $2}' /proc/$dpid/status)
  g="$tmp/g-lazy"; reset_graph "$g"
  t0=$(now)
  out=$(pm "$g" --storage-opt "overlay.additionallayerstore=$tmp/mnt:ref" run --rm --tls-verify=false "127.0.0.1:$port/app:soci" "${ready_cmd[@]}")
  t1=$(now); [ "$out" = ready ] || { echo "lazy run printed: $out"; exit 1; }
  lazy+=("$(echo "$t1 - $t0" | bc)")
  fetched+=("$(in_ns curl -sf http://127.0.0.1:9300/metrics | awk '/^soci_store_bytes_fetched_total/ {print $2}')")
  rss_peak=$(awk '/VmHWM/ {print $2}' /proc/$dpid/status)
  reset_graph "$g"
  kill -TERM "$dpid"; while kill -0 "$dpid" 2>/dev/null; do sleep 0.05; done; wait "$spid" || true
done

# Warm sequential read of a 500 MB file through the mount vs the same file on local disk.
in_ns tc qdisc del dev lo root
rm -rf "$tmp/cache" "$tmp/artifacts"
in_ns "$bin" --config "$tmp/config.toml" serve "$tmp/mnt" --no-background-fetch >"$tmp/serve.log" 2>&1 &
spid=$!; pids+=($spid)
until grep -q " $tmp/mnt " /proc/self/mounts; do sleep 0.05; done
dpid=$(pgrep -n -f -- "serve $tmp/mnt")
big_digest=$(python3 -c "import json; m=json.load(open('$tmp/big/blobs/sha256/'+json.load(open('$tmp/big/index.json'))['manifests'][0]['digest'][7:])); print(m['layers'][0]['digest'])")
b64=$(printf '%s' "127.0.0.1:$port/big:soci" | base64 -w0)
f="$tmp/mnt/$b64/$big_digest/diff/big.bin"
in_ns cat "$f" > /dev/null                 # cold: fetches every span once
t0=$(now); dd if="$f" of=/dev/null bs=1M status=none; t1=$(now); t_mount=$(echo "$t1 - $t0" | bc)
cat "$tmp/bigroot/big.bin" > /dev/null      # page cache warm, like the store's caches
t0=$(now); dd if="$tmp/bigroot/big.bin" of=/dev/null bs=1M status=none; t1=$(now); t_disk=$(echo "$t1 - $t0" | bc)
rss_read=$(awk '/VmHWM/ {print $2}' /proc/$dpid/status)
kill -TERM "$dpid"; while kill -0 "$dpid" 2>/dev/null; do sleep 0.05; done; wait "$spid" || true

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mp=$(median "${plain[@]}"); ml=$(median "${lazy[@]}"); mf=$(median "${fetched[@]}")
echo "span size: ${SPAN_SIZE:-convert default}; background fetch: ${BACKGROUND:-0}"
echo "zTOC bytes: $ztoc_bytes"
echo "plain runs (s): ${plain[*]}"
echo "lazy runs (s): ${lazy[*]}"
echo "bytes fetched per lazy start: ${fetched[*]} (image: $image_bytes compressed bytes)"
printf '| time to ready, 100 Mbit/s | lazy: %.2f s | plain pull + run: %.2f s | %.1fx faster | >= 5x |\n' "$ml" "$mp" "$(echo "$mp / $ml" | bc -l)"
printf '| bytes fetched for the lazy start | %.1f MB | image: %.1f MB | %.3f | - |\n' "$(echo "$mf / 1000000" | bc -l)" "$(echo "$image_bytes / 1000000" | bc -l)" "$(echo "$mf / $image_bytes" | bc -l)"
printf '| warm sequential read, 500 MB file, 1 MiB reads | %.0f MB/s | local disk (page cache): %.0f MB/s | %.2f | >= 0.5 |\n' "$(echo "500 / $t_mount" | bc -l)" "$(echo "500 / $t_disk" | bc -l)" "$(echo "$t_disk / $t_mount" | bc -l)"
printf '| daemon RSS | idle: %.0f MiB | peak while serving the lazy start: %.0f MiB; after the 500 MB read: %.0f MiB | - | - |\n' "$(echo "$rss_idle / 1024" | bc -l)" "$(echo "$rss_peak / 1024" | bc -l)" "$(echo "$rss_read / 1024" | bc -l)"
