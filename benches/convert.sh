#!/usr/bin/env bash
# `soci-store convert` wall time for a realistic image (debootstrap bookworm + python3 + perl, two
# gzip layers) from a local registry, against downloading and decompressing the same image once:
# `skopeo copy` to an OCI directory plus `gzip -dc` of its layers. Medians of 3 alternating runs.
#   usage: benches/convert.sh [WORKDIR]     (shares the debootstrap tree with benches/ztoc.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/bench}"
mkdir -p "$work"
root="$work/root"
if [ ! -x "$root/usr/bin/python3" ]; then
  command -v debootstrap >/dev/null || apt-get install -y debootstrap
  debootstrap --variant=minbase --include=python3,perl bookworm "$root" "$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
cargo build --release --quiet
bin="$PWD/target/release/soci-store"
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
cat > "$tmp/reg.yml" <<Y
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $tmp/data}}
http: {addr: 127.0.0.1:$port}
Y
env -u AWS_CA_BUNDLE docker-registry serve "$tmp/reg.yml" >/dev/null 2>&1 &
reg_pid=$!
until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do sleep 0.1; done

# Two layers (usr, the rest) as an OCI layout, pushed with skopeo.
layout="$tmp/src"
mkdir -p "$layout/blobs/sha256"
tar --numeric-owner --sort=name -C "$root" -cf "$tmp/l1.tar" ./usr
tar --numeric-owner --sort=name -C "$root" --exclude=./usr -cf "$tmp/l2.tar" .
python3 - "$tmp" "$layout" <<'PY'
import gzip, hashlib, json, os, shutil, subprocess, sys
tmp, layout = sys.argv[1], sys.argv[2]
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{layout}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
layers, diffs = [], []
for name in ("l1", "l2"):
    raw = open(f"{tmp}/{name}.tar", "rb").read()
    diffs.append("sha256:" + hashlib.sha256(raw).hexdigest())
    gz = subprocess.run(["gzip", "-6", "-n", "-c", f"{tmp}/{name}.tar"], capture_output=True, check=True).stdout
    d, n = put(gz)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs}, "config": {}}).encode()
cd, cn = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn}, "layers": layers}).encode()
md, mn = put(man)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{layout}/index.json", "w"))
open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
print("image:", ", ".join(f"{l['size']/1e6:.0f} MB" for l in layers), "gzip layers;", ", ".join(f"{os.path.getsize(f'{tmp}/{n}.tar')/1e6:.0f} MB" for n in ("l1","l2")), "tar")
PY
rm -f "$tmp/l1.tar" "$tmp/l2.tar"
skopeo copy -q --dest-tls-verify=false "oci:$layout:v1" "docker://127.0.0.1:$port/bench:v1"
cat > "$tmp/config.toml" <<C
artifacts = "$tmp/artifacts"
[[fetchers]]
type = "registry"
insecure = ["127.0.0.1:$port"]
[cache]
type = "memory"
max_bytes = "64MiB"
C

now() { date +%s.%N; }
conv=(); base=()
for i in 1 2 3; do
  t0=$(now)
  "$bin" --config "$tmp/config.toml" convert --quiet "127.0.0.1:$port/bench:v1" "127.0.0.1:$port/bench:soci$i"
  t1=$(now); conv+=("$(echo "$t1 - $t0" | bc)")
  rm -rf "$tmp/copy"
  t0=$(now)
  skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/bench:v1" "oci:$tmp/copy:v1"
  for b in $(python3 -c "import json,sys; m=json.load(open('$tmp/copy/blobs/sha256/'+json.load(open('$tmp/copy/index.json'))['manifests'][0]['digest'][7:])); print(' '.join(l['digest'][7:] for l in m['layers']))"); do
    gzip -dc "$tmp/copy/blobs/sha256/$b" > /dev/null
  done
  t1=$(now); base+=("$(echo "$t1 - $t0" | bc)")
done
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
mc=$(median "${conv[@]}"); mb=$(median "${base[@]}")
echo "convert runs (s): ${conv[*]}"
echo "skopeo copy + gzip -dc runs (s): ${base[*]}"
printf '| convert wall time | %.2f s | skopeo copy + gzip -dc: %.2f s | %.2f | <= 1.0 |\n' "$mc" "$mb" "$(echo "$mc / $mb" | bc -l)"
