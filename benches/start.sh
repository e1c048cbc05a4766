#!/usr/bin/env bash
# The lazy start on a realistic image: time from `podman run` to a ready line, plain (pull + run)
# against lazy (the same through `soci-store serve` as podman's additional layer store, on the
# SOCI-converted tag), with podman 4 (the host) and podman 5 (the Debian 13 chroot), over a
# 100 Mbit/s link (tbf on the loopback of a private network namespace holding the registry, the
# store and podman) and over plain loopback. Runs are interleaved; medians and min–max of REPS.
#
# The image (built once, cached in target/bench-start/; only the Debian mirror is used, taken from
# the host's apt sources), four gzip layers:
#   1 base    debootstrap --variant=minbase bookworm
#   2 python  what installing python3, python3-numpy, python3-yaml adds to 1
#   3 bulk    what installing gcc, g++, libllvm14 adds to 1+2, plus /opt/bulk/marker.txt
#   4 app     /app/app.py, a whiteout (.wh.motd in /etc) and an opaque directory
#             (/usr/share/doc/python3-yaml/.wh..wh..opq)
# The workload, `python3 /app/app.py`: imports numpy, yaml, sqlite3, reads the marker, checks the
# whiteout and the opaque directory, prints "ready".
#
# Per lazy run (a fresh `serve`, empty cache and artifact store, fresh podman graph root) it also
# reports the bytes taken from the registry before ready (registry access log, split by user agent:
# the store's requests start with "soci-store/"), the zTOC/artifact share of the store's bytes,
# soci_store_layers_served (metrics endpoint) and the daemon's peak RSS (VmHWM) at ready.
#
#   usage: [REPS=5] [PODMANS="4 5"] [NETS="shaped unshaped"] [SPAN_SIZE=4MiB] [CONVERT_ARGS=…]
#          [VARIANTS="default=;span4=--span-size 4MiB"] [NOBG=1] [SERVE_VARIANTS=…] [SERVE_ARGS=…] [RATE=100mbit]
#          [BIN=target/release/soci-store] [RUN_TIMEOUT=600] [RETRIES=1] [OUT=FILE] benches/start.sh
#   VARIANTS  ';'-separated NAME=CONVERT-ARGS; each is converted to its own tag and gets its own
#             lazy runs in every round (default: one variant, "default", or "span-SIZE" with
#             SPAN_SIZE). SPAN_SIZE and CONVERT_ARGS are added to every variant's convert args.
#             NAME=@zstd:chunked is not converted: podman 5 pushes the image as zstd:chunked
#             (no SOCI index; the store reads each layer's own TOC), and that image also gets
#             plain runs of its own, its baseline (needs "5" in PODMANS).
#   TRACE_DIR every lazy run's `serve --trace` file is kept there (VER-NET-KIND-VARIANT-REP.jsonl).
#   NOBG=1    adds lazy runs with `serve --no-background-fetch` (main config: every default).
#   SERVE_VARIANTS  ';'-separated NAME=SERVE-ARGS: lazy runs of each convert variant with those
#             `serve` arguments too (NOBG=1 is "nobg=--no-background-fetch").
#   PODMANS   "4" (host), "5" (chroot at $PODMAN5_ROOT, default /var/cache/soci-store-ci/trixie,
#             made by .ci/podman-chroot.sh trixie), or both.
#   OUT       every run as a TSV row (default target/bench-start/runs-DATE.tsv; the registry's
#             access log is kept beside it as runs-DATE.access.log).
#   RETRIES   a failed run (no ready line; podman 4.3.1 sometimes loses a --rm container's exit
#             code) is counted as failed and run again up to RETRIES times (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
reps="${REPS:-5}"
podmans="${PODMANS:-4 5}"
nets="${NETS:-shaped unshaped}"
rate="${RATE:-100mbit}"
run_timeout="${RUN_TIMEOUT:-600}"
bin="$(realpath "${BIN:-target/release/soci-store}")"
r5src="${PODMAN5_ROOT:-/var/cache/soci-store-ci/trixie}"
cache="$repo/target/bench-start"
out_tsv="${OUT:-$cache/runs-$(date +%Y%m%d-%H%M%S).tsv}"
[ -x "$bin" ] || { echo "no soci-store binary at $bin (set BIN)" >&2; exit 1; }
for c in debootstrap skopeo docker-registry podman nsenter tc python3 curl; do
  command -v "$c" >/dev/null || { echo "missing $c (see ../shared/docs/test-machine.md)" >&2; exit 1; }
done
case " $podmans " in *" 5 "*) [ -x "$r5src/usr/bin/podman" ] || { echo "no podman 5 chroot at $r5src (.ci/podman-chroot.sh trixie)" >&2; exit 1; } ;; esac

# Variants: NAME=ARGS;…
if [ -n "${VARIANTS:-}" ]; then variants_spec="$VARIANTS"
elif [ -n "${SPAN_SIZE:-}" ]; then variants_spec="span-$SPAN_SIZE="
else variants_spec="default="; fi
# Serve variants: NAME=SERVE-ARGS;… (each adds lazy runs of every convert variant).
svnames=(); declare -A svargs
serve_spec="${SERVE_VARIANTS:-}"
[ "${NOBG:-0}" = 1 ] && serve_spec="${serve_spec:+$serve_spec;}nobg=--no-background-fetch"
if [ -n "$serve_spec" ]; then
  IFS=';' read -r -a _svs <<<"$serve_spec"
  for sv in "${_svs[@]}"; do svnames+=("${sv%%=*}"); svargs[${sv%%=*}]="${sv#*=}"; done
fi
vnames=(); declare -A vargs
IFS=';' read -r -a _vs <<<"$variants_spec"
for v in "${_vs[@]}"; do
  [ -n "$v" ] || continue
  n="${v%%=*}"; a=""; [[ "$v" == *=* ]] && a="${v#*=}"
  if [ "$a" != "@zstd:chunked" ]; then
    [ -n "${SPAN_SIZE:-}" ] && a="$a --span-size $SPAN_SIZE"
    [ -n "${CONVERT_ARGS:-}" ] && a="$a $CONVERT_ARGS"
  fi
  vnames+=("$n"); vargs[$n]="$a"
done

tmp=""; ns=""; reg_pid=""; daemon_pid=""; holder_pid=""; build_mounts=()
now() { date +%s.%N; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
mounts_under() { awk -v p="$1/" 'index($2, p) == 1 || $2 == substr(p, 1, length(p) - 1) {print $2}' /proc/self/mounts | awk '{print length($0), $0}' | sort -rn | cut -d' ' -f2-; }
umount_under() { local m; for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done; }
stop_daemon() {
  [ -n "$daemon_pid" ] || return 0
  kill -TERM "$daemon_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$daemon_pid" 2>/dev/null || true
  wait "$daemon_pid" 2>/dev/null || true
  # The FUSE holder exits by itself once the mount is gone; stop it if it is still there.
  if [ -n "$holder_pid" ] && grep -q hold-fuse "/proc/$holder_pid/cmdline" 2>/dev/null; then kill -TERM "$holder_pid" 2>/dev/null || true; fi
  daemon_pid=""; holder_pid=""
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$tmp" ] && [ -d "$tmp" ]; then
    # podman first (containers of an interrupted run), while the store still answers.
    [ -d "$tmp/g4" ] && timeout 60 env CONTAINERS_CONF="$tmp/containers.conf" podman --root "$tmp/g4/root" --runroot "$tmp/g4/run" --storage-driver overlay system reset -f >/dev/null 2>&1
    [ -d "$tmp/p5/g5" ] && [ -x "$tmp/r5/usr/bin/podman" ] && timeout 60 chroot "$tmp/r5" env PODMAN_IGNORE_CGROUPSV1_WARNING=1 CONTAINERS_CONF=/mnt/containers.conf podman --root /mnt/g5/root --runroot /run/soci-bench --storage-driver overlay system reset -f >/dev/null 2>&1
    stop_daemon
    [ -n "$reg_pid" ] && { kill -TERM "$reg_pid" 2>/dev/null; wait "$reg_pid" 2>/dev/null; }
    # Every mount below $tmp, deepest first: podman's, the store's, the chroot's bind mounts.
    umount_under "$tmp"
    umount_under "$tmp"
  fi
  for m in "${build_mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null
  if [ -n "$tmp" ] && [ -d "$tmp" ]; then
    # Never delete through a mount that is still there (the chroot is a bind mount of the same fs).
    if [ -z "$(mounts_under "$tmp")" ]; then rm -rf --one-file-system "$tmp"
    else echo "cleanup: mounts left under $tmp, not deleting it:" >&2; mounts_under "$tmp" >&2; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# The image (cached): debootstrap trees, layer diffs, OCI layout.
image_version="start-image-v2"
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
[ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt/sources.list.d/debian.sources" >&2; exit 1; }
py_pkgs="python3 python3-numpy python3-yaml"
bulk_pkgs="gcc g++ libllvm14"
layout="$cache/oci"
in_tree() {  # in_tree TREE CMD…: run in the tree with /proc and /dev
  local t="$1"; shift
  mount -t proc proc "$t/proc"; build_mounts+=("$t/proc")
  mount --bind /dev "$t/dev"; build_mounts+=("$t/dev")
  mount --bind /dev/pts "$t/dev/pts"; build_mounts+=("$t/dev/pts")
  cp /etc/resolv.conf "$t/etc/resolv.conf"
  local rc=0
  chroot "$t" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@" || rc=$?
  umount "$t/dev/pts"; umount "$t/dev"; umount "$t/proc"; build_mounts=()
  return $rc
}
apt_in() {  # apt_in TREE PKG…
  local t="$1"; shift
  in_tree "$t" sh -c "apt-get -o Acquire::Check-Valid-Until=false update -qq && apt-get install -y -qq --no-install-recommends $* >/dev/null && apt-get clean"
  rm -rf "$t"/var/lib/apt/lists/* "$t"/var/cache/apt/*.bin
}
image_stamp="$image_version: $py_pkgs + $bulk_pkgs"
if [ "$(cat "$layout/stamp" 2>/dev/null)" != "$image_stamp" ]; then
  log "building the image in $cache (mirror $mirror)"
  mkdir -p "$cache"
  t0=$(now)
  if [ ! -x "$cache/base/usr/bin/apt-get" ] || [ ! -f "$cache/base/.done" ]; then
    rm -rf "$cache/base"
    debootstrap --variant=minbase bookworm "$cache/base" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$cache"/base/var/cache/apt/archives/*.deb "$cache"/base/var/lib/apt/lists/* "$cache"/base/var/cache/apt/*.bin
    touch "$cache/base/.done"
  fi
  # Each tree's .done holds what it was made with: a change rebuilds it and the trees above.
  if [ "$(cat "$cache/py/.done" 2>/dev/null)" != "$py_pkgs" ]; then
    rm -rf "$cache/py"; cp -a "$cache/base" "$cache/py"; rm -f "$cache/py/.done"
    apt_in "$cache/py" $py_pkgs
    echo "$py_pkgs" > "$cache/py/.done"; rm -f "$cache/bulk/.done"
  fi
  if [ "$(cat "$cache/bulk/.done" 2>/dev/null)" != "$py_pkgs + $bulk_pkgs" ]; then
    rm -rf "$cache/bulk"; cp -a "$cache/py" "$cache/bulk"; rm -f "$cache/bulk/.done"
    apt_in "$cache/bulk" $bulk_pkgs
    mkdir -p "$cache/bulk/opt/bulk"
    echo "bulk layer marker: the one file of this layer the workload reads" > "$cache/bulk/opt/bulk/marker.txt"
    echo "$py_pkgs + $bulk_pkgs" > "$cache/bulk/.done"
  fi
  rm -rf "$layout"
  python3 - "$cache" "$layout" <<'PY'
import hashlib, io, json, os, stat, subprocess, sys, tarfile
cache, layout = sys.argv[1], sys.argv[2]
os.makedirs(f"{layout}/blobs/sha256", exist_ok=True)
SKIP = {".done"}
EMPTY = {"dev", "proc", "sys"}  # kept as empty directories, as in published images

def walk(root):
    """Relative paths of every entry of a tree (not descending into dev, proc, sys)."""
    out = []
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel != "." and rel.split("/")[0] in EMPTY:
            dirs[:] = []
            continue
        for n in dirs + files:
            p = n if rel == "." else f"{rel}/{n}"
            if p in SKIP:
                continue
            out.append(p)
    return out

def key(st, root, p):
    k = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    if stat.S_ISREG(st.st_mode):
        k += (st.st_size,)
    if stat.S_ISLNK(st.st_mode):
        k += (os.readlink(f"{root}/{p}"),)
    return k

def ancestors(p):
    parts = p.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]

def write_tar(path, root, paths, whiteouts=(), extra=()):
    """paths: entries of root; whiteouts: names to add as empty .wh. files; extra: (TarInfo, bytes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        items = [(p, "file") for p in paths] + [(w, "wh") for w in whiteouts] + [(ti.name, ti, data) for ti, data in extra]
        items.sort(key=lambda it: it[0])
        for it in items:
            if it[1] == "file":
                p = it[0]
                full = f"{root}/{p}"
                ti = tar.gettarinfo(full, arcname=p)
                if ti is None:  # sockets
                    continue
                ti.uname = ti.gname = ""
                if ti.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
            elif it[1] == "wh":
                ti = tarfile.TarInfo(it[0]); ti.mode = 0o644; ti.mtime = 0
                tar.addfile(ti)
            else:
                _, ti, data = it
                tar.addfile(ti, io.BytesIO(data) if data is not None else None)

def diff(lower, upper):
    lo = {p: key(os.lstat(f"{lower}/{p}"), lower, p) for p in walk(lower)}
    up = walk(upper)
    upset = set(up)
    changed = set()
    for p in up:
        if lo.get(p) != key(os.lstat(f"{upper}/{p}"), upper, p):
            changed.add(p)
    deleted = [p for p in lo if p not in upset]
    dset = set(deleted)
    whiteouts = []
    for p in deleted:
        par = os.path.dirname(p)
        if par in dset:
            continue
        whiteouts.append(f"{par}/.wh.{os.path.basename(p)}" if par else f".wh.{p}")
    for p in list(changed) + whiteouts:
        changed.update(a for a in ancestors(p) if a in upset)
    return sorted(changed), whiteouts

def dirinfo(name):
    ti = tarfile.TarInfo(name); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; ti.mtime = 1700000000
    return (ti, None)

def fileinfo(name, data, mode=0o644):
    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mode = mode; ti.mtime = 1700000000
    return (ti, data)

APP = b'''import os
import numpy, yaml, sqlite3
marker = open("/opt/bulk/marker.txt").read().strip()
# The app layer's whiteout and opaque directory hide what the lower layers have there.
assert not os.path.exists("/etc/motd"), "whiteout of /etc/motd not applied"
assert os.listdir("/usr/share/doc/python3-yaml") == ["README.app"], "opaque directory not applied"
assert numpy.arange(4).sum() == 6 and yaml.safe_load("a: 1") == {"a": 1}
assert sqlite3.connect(":memory:").execute("select 1").fetchone() == (1,)
print(marker and "ready", flush=True)
'''

tars, stats = [], []
base, py, bulk = f"{cache}/base", f"{cache}/py", f"{cache}/bulk"
assert os.path.exists(f"{base}/etc/motd") and os.path.isdir(f"{py}/usr/share/doc/python3-yaml")
t = f"{cache}/l1.tar"; p1 = walk(base); write_tar(t, base, p1); tars.append(t); stats.append(("base", len(p1), 0))
ch, wh = diff(base, py); t = f"{cache}/l2.tar"; write_tar(t, py, ch, wh); tars.append(t); stats.append(("python", len(ch), len(wh)))
ch, wh = diff(py, bulk); t = f"{cache}/l3.tar"; write_tar(t, bulk, ch, wh); tars.append(t); stats.append(("bulk", len(ch), len(wh)))
extra = [dirinfo("app"), fileinfo("app/app.py", APP), dirinfo("etc"), dirinfo("usr"), dirinfo("usr/share"),
         dirinfo("usr/share/doc"), dirinfo("usr/share/doc/python3-yaml"),
         fileinfo("usr/share/doc/python3-yaml/.wh..wh..opq", b""),
         fileinfo("usr/share/doc/python3-yaml/README.app", b"the app layer replaced this directory\n")]
t = f"{cache}/l4.tar"; write_tar(t, None, [], ["etc/.wh.motd"], extra); tars.append(t); stats.append(("app", len(extra), 1))

def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(f"{layout}/blobs/sha256/{d}", "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)
layers, diffs, names = [], [], []
for t, (name, n, w) in zip(tars, stats):
    h = hashlib.sha256()
    with open(t, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    diffs.append("sha256:" + h.hexdigest())
    gz = subprocess.run(["gzip", "-6", "-n", "-c", t], capture_output=True, check=True).stdout
    d, size = put(gz)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size})
    print(f"layer {name}: {n} entries, {w} whiteouts, {os.path.getsize(t)/1e6:.1f} MB tar, {size/1e6:.1f} MB gzip", file=sys.stderr)
    os.remove(t)
cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs},
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["python3", "/app/app.py"]},
    "history": [{"created_by": n} for n in ("debootstrap minbase bookworm", "apt-get install python3 python3-numpy python3-yaml",
                "apt-get install gcc g++ libllvm14; /opt/bulk/marker.txt", "app, whiteout, opaque dir")]}).encode()
cd, cn = put(cfg)
md, mn = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn}, "layers": layers}).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{layout}/index.json", "w"))
open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
  echo "$image_stamp" > "$layout/stamp"
  log "image built in $(printf '%.0f' "$(echo "$(now) - $t0" | bc)") s"
fi
# Layer digests and sizes of the source image.
read -r manifest_digest < <(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['manifests'][0]['digest'])" "$layout/index.json")
layer_info=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); [print(l['digest'], l['size']) for l in m['layers']]" "$layout/blobs/sha256/${manifest_digest#sha256:}")
image_bytes=$(awk '{s+=$2} END {print s}' <<<"$layer_info")
layer_sizes=$(awk '{printf "%s%.1f", (NR>1?" + ":""), $2/1e6} END {print " MB"}' <<<"$layer_info")

# ---------------------------------------------------------------------------------------------
# Registry, network namespace, configs, the podman 5 chroot.
tmp=$(mktemp -d /var/tmp/soci-start.XXXXXX)
ns="soci-start-$$"
ip netns add "$ns"
nsf="/var/run/netns/$ns"
# nsenter enters only the network namespace (ip netns exec would also remount /sys, hiding the
# cgroup mounts podman needs, and give FUSE mounts their own mount namespace).
in_ns() { nsenter --net="$nsf" "$@"; }
in_ns ip link set lo up
port=5000
reg="127.0.0.1:$port"
cat > "$tmp/reg.yml" <<Y
version: 0.1
log: {level: error, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $tmp/data}}
http: {addr: $reg}
Y
nsenter --net="$nsf" env -u AWS_CA_BUNDLE docker-registry serve "$tmp/reg.yml" >"$tmp/access.log" 2>"$tmp/reg.err" &
reg_pid=$!
for _ in $(seq 100); do in_ns curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
in_ns skopeo copy -q --dest-tls-verify=false "oci:$layout:v1" "docker://$reg/app:v1"

cat > "$tmp/convert.toml" <<C
artifacts = "$tmp/convert-artifacts"
state_dir = "$tmp/state"
[[fetchers]]
type = "registry"
insecure = ["$reg"]
registries_conf = "/nonexistent"
[cache]
type = "memory"
C
# serve: every default but the paths (and the metrics endpoint).
cat > "$tmp/serve.toml" <<C
artifacts = "$tmp/srv/artifacts"
state_dir = "$tmp/srv/state"
local_files = "$tmp/srv/files"
metrics_address = "127.0.0.1:9300"
[[fetchers]]
type = "registry"
insecure = ["$reg"]
registries_conf = "/nonexistent"
[cache]
type = "tiered"
path = "$tmp/srv/cache"
C
declare -A ztoc_bytes ztoc_layers
for v in "${vnames[@]}"; do
  [ "${vargs[$v]}" = "@zstd:chunked" ] && { ztoc_bytes[$v]=0; ztoc_layers[$v]="none (zstd:chunked)"; continue; }
  rm -rf "$tmp/convert-artifacts"
  # shellcheck disable=SC2086
  in_ns "$bin" --config "$tmp/convert.toml" convert --json ${vargs[$v]} "$reg/app:v1" "$reg/app:soci-$v" > "$tmp/convert.json"
  # zTOCs are the artifact store's big blobs (indexes and manifests are a few hundred bytes).
  ztoc_bytes[$v]=$(find "$tmp/convert-artifacts" -type f -size +8k -printf '%s\n' | awk '{s+=$1} END {print s+0}')
  ztoc_layers[$v]=$(python3 - "$tmp/convert.json" "$tmp/convert-artifacts" <<'PY' || true
import json, os, sys
j, art = json.load(open(sys.argv[1])), sys.argv[2]
out = []
for l in j["platforms"][0]["layers"]:
    z = l.get("ztoc")
    p = f"{art}/blobs/sha256/{z[7:]}" if z else None
    out.append(f"{os.path.getsize(p)/1e6:.1f} MB/{l.get('spans')} spans" if p and os.path.exists(p) else "-")
print(" + ".join(out))
PY
)
  log "variant $v (convert args:${vargs[$v]:- none}): zTOCs $(echo "${ztoc_bytes[$v]} / 1000000" | bc -l | xargs printf '%.1f') MB (per layer: ${ztoc_layers[$v]})"
done

cat > "$tmp/containers.conf" <<C
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=1024:4096"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
C
mkdir -p "$tmp/g4" "$tmp/store4"
pv4=$(podman --version | awk '{print $3}')
pv5=""
zstd_variants=(); for v in "${vnames[@]}"; do [ "${vargs[$v]}" = "@zstd:chunked" ] && zstd_variants+=("$v"); done
if [ ${#zstd_variants[@]} -gt 0 ]; then
  case " $podmans " in *" 5 "*) ;; *) echo "a @zstd:chunked variant needs podman 5 (PODMANS=\"4 5\")" >&2; exit 1 ;; esac
fi
case " $podmans " in *" 5 "*)
  # A private bind mount of the chroot (so the tests' own mounts of it are not disturbed), with
  # our scratch directory on its /mnt (graph root, store mountpoint, containers.conf).
  r5="$tmp/r5"; mkdir -p "$r5" "$tmp/p5/store"
  mount --bind "$r5src" "$r5"; mount --make-private "$r5"
  mount -t proc proc "$r5/proc"
  mount --rbind /sys "$r5/sys"; mount --make-rslave "$r5/sys"
  mount --bind /dev "$r5/dev"; mount --bind /dev/pts "$r5/dev/pts"
  mount -t tmpfs tmpfs "$r5/run"
  mount --bind "$tmp/p5" "$r5/mnt"; mount --make-private "$r5/mnt"
  cp "$tmp/containers.conf" "$r5/mnt/containers.conf"
  pv5=$(chroot "$r5" podman --version | awk '{print $3}')
  ;;
esac

pm() {  # pm 4|5 ARGS…  (podman of that generation, own graph root, in the namespace)
  local ver="$1"; shift
  if [ "$ver" = 4 ]; then
    in_ns env CONTAINERS_CONF="$tmp/containers.conf" podman --root "$tmp/g4/root" --runroot "$tmp/g4/run" --storage-driver overlay "$@"
  else
    in_ns chroot "$r5" env PODMAN_IGNORE_CGROUPSV1_WARNING=1 CONTAINERS_CONF=/mnt/containers.conf podman --root /mnt/g5/root --runroot /run/soci-bench --storage-driver overlay "$@"
  fi
}
graph_dir() { if [ "$1" = 4 ]; then echo "$tmp/g4"; else echo "$r5/mnt/g5"; fi; }
# zstd:chunked variants: podman 5 pushes the source image again, as zstd:chunked.
for v in "${zstd_variants[@]}"; do
  mkdir -p "$r5/mnt/g5"
  pm 5 pull -q --tls-verify=false "$reg/app:v1" >/dev/null
  pm 5 push -q --tls-verify=false --compression-format zstd:chunked "$reg/app:v1" "$reg/app:soci-$v"
  pm 5 system reset -f >/dev/null 2>&1 || true
  rm -rf --one-file-system "$r5/mnt/g5"
  zd=$(in_ns curl -sf -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$reg/v2/app/manifests/soci-$v" \
    | python3 -c "import json,sys; m=json.load(sys.stdin); print(' '.join(l['digest'] for l in m['layers'])); print(sum(l['size'] for l in m['layers']), file=sys.stderr)" 2>"$tmp/zstd-size")
  zstd_layers="${zstd_layers:-} $zd"
  log "variant $v: pushed as zstd:chunked by podman $(chroot "$r5" podman --version | awk '{print $3}'), $(awk '{printf "%.1f", $1/1e6}' "$tmp/zstd-size") MB"
done
store_host() { if [ "$1" = 4 ]; then echo "$tmp/store4"; else echo "$r5/mnt/store"; fi; }
store_seen() { if [ "$1" = 4 ]; then echo "$tmp/store4"; else echo "/mnt/store"; fi; }
reset_graph() {  # reset_graph 4|5
  local g; g=$(graph_dir "$1")
  [ -d "$g/root" ] && { timeout 120 pm "$1" system reset -f >/dev/null 2>&1 || true; }
  umount_under "$g"
  rm -rf --one-file-system "$g"
  [ "$1" = 5 ] && rm -rf "$r5/run/soci-bench"
  mkdir -p "$g"
}
start_daemon() {  # start_daemon 4|5 [serve args…]
  local ver="$1"; shift
  local m; m=$(store_host "$ver")
  rm -rf "$tmp/srv"; mkdir -p "$tmp/srv" "$m"
  # nsenter execs the daemon: $! is the serve process.
  nsenter --net="$nsf" "$bin" --config "$tmp/serve.toml" serve "$m" "$@" >"$tmp/serve.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 300); do
    grep -q " $m fuse" /proc/self/mounts && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$tmp/serve.log" >&2; echo "serve exited" >&2; exit 1; }
    sleep 0.05
  done
  grep -q " $m fuse" /proc/self/mounts || { cat "$tmp/serve.log" >&2; echo "serve did not mount $m" >&2; exit 1; }
  holder_pid=$(cat /proc/"$daemon_pid"/task/*/children 2>/dev/null | xargs -n1 2>/dev/null | head -1 || true)
  for _ in $(seq 100); do in_ns curl -sf http://127.0.0.1:9300/metrics >/dev/null && break; sleep 0.05; done
}
# Registry bytes in access-log lines [FROM, TO): podman's, the store's, the store's artifact
# (non-layer) bytes, the store's layer requests, the store's bytes per layer (L1/L2/…).
layer_digests="$(awk '{print $1}' <<<"$layer_info" | paste -sd' ')${zstd_layers:-}"
log_bytes() {
  tail -c +"$(($1 + 1))" "$tmp/access.log" | head -c "$(($2 - $1))" | awk -F'"' -v layers="$layer_digests" '
    BEGIN { n = split(layers, a, " "); for (i = 1; i <= n; i++) L["/blobs/" a[i]] = i }
    { split($3, s, " "); b = s[2] + 0; split($2, r, " "); path = r[2]
      if ($6 ~ /^soci-store/) {
        st += b; layer = 0
        for (k in L) if (index(path, k) > 0) layer = L[k]
        if (layer) { sl++; lb[layer] += b } else { sa += b }
      } else pb += b }
    END { per = ""; for (i = 1; i <= n; i++) per = per (i > 1 ? "/" : "") (lb[i] + 0)
          printf "%d %d %d %d %s\n", pb, st, sa, sl, per }'
}

# ---------------------------------------------------------------------------------------------
# One run: run_one VER NET KIND VARIANT REP; appends a TSV row.
printf 'podman\tnet\tkind\tvariant\trep\tok\tready_s\texit_s\tpodman_bytes\tstore_bytes\tstore_artifact_bytes\tstore_layer_requests\tstore_bytes_per_layer\tlayers_served\tmetric_bytes_fetched\trss_hwm_kib_ready\trss_hwm_kib_end\n' > "$out_tsv"
run_one() {
  local ver="$1" net="$2" kind="$3" variant="$4" rep="$5"
  local image="$reg/app:v1" sopt=() m
  reset_graph "$ver"
  if [ "$kind" != plain ]; then
    local sargs=()
    # shellcheck disable=SC2206
    [ "$kind" != lazy ] && sargs+=(${svargs[${kind#lazy-}]})
    # shellcheck disable=SC2206
    [ -n "${SERVE_ARGS:-}" ] && sargs+=($SERVE_ARGS)
    [ -n "${TRACE_DIR:-}" ] && { mkdir -p "$TRACE_DIR"; sargs+=(--trace "$TRACE_DIR/$ver-$net-$kind-$variant-$rep.jsonl"); }
    start_daemon "$ver" "${sargs[@]}"
    image="$reg/app:soci-$variant"
    sopt=(--storage-opt "overlay.additionallayerstore=$(store_seen "$ver"):ref")
  elif [ -n "$variant" ]; then
    image="$reg/app:soci-$variant"    # the plain pull of a zstd:chunked variant
  fi
  rm -f "$tmp"/at_ready.*
  local log0; log0=$(stat -c %s "$tmp/access.log")
  local ok=1 t0 t1
  t0=$(now)
  # At the ready line: the time, the access log's length, the metrics, the daemon's peak RSS.
  timeout "$run_timeout" bash -c '
      ver=$1; shift
      if [ "$ver" = 4 ]; then exec nsenter --net="$NSF" env CONTAINERS_CONF="$TMPD/containers.conf" podman --root "$TMPD/g4/root" --runroot "$TMPD/g4/run" --storage-driver overlay "$@"
      else exec nsenter --net="$NSF" chroot "$TMPD/r5" env PODMAN_IGNORE_CGROUPSV1_WARNING=1 CONTAINERS_CONF=/mnt/containers.conf podman --root /mnt/g5/root --runroot /run/soci-bench --storage-driver overlay "$@"; fi
    ' _ "$ver" "${sopt[@]}" run --rm --tls-verify=false "$image" python3 /app/app.py 2>"$tmp/podman.err" \
    | while IFS= read -r line; do
        echo "$line" >> "$tmp/podman.out"
        if [ "$line" = ready ]; then
          now > "$tmp/at_ready.t"
          stat -c %s "$tmp/access.log" > "$tmp/at_ready.log"
          if [ -n "$daemon_pid" ]; then
            in_ns curl -sf http://127.0.0.1:9300/metrics > "$tmp/at_ready.metrics" || true
            awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status" > "$tmp/at_ready.rss" 2>/dev/null || true
          fi
        fi
      done || ok=0
  t1=$(now)
  [ -f "$tmp/at_ready.t" ] || ok=0
  local ready_s=nan exit_s pb=0 sb=0 sa=0 sl=0 per="" served="" fetched="" rss="" rss_end=""
  exit_s=$(echo "$t1 - $t0" | bc)
  if [ "$ok" = 1 ]; then
    ready_s=$(echo "$(cat "$tmp/at_ready.t") - $t0" | bc)
    read -r pb sb sa sl per < <(log_bytes "$log0" "$(cat "$tmp/at_ready.log")")
  else
    log "FAILED: podman $ver $net $kind $variant rep $rep (after ${exit_s}s):"
    tail -5 "$tmp/podman.err" >&2 || true
    cp "$tmp/podman.err" "$cache/failed-$ver-$net-$kind-$variant-$rep.err" 2>/dev/null || true
    [ -n "$daemon_pid" ] && cp "$tmp/serve.log" "$cache/failed-$ver-$net-$kind-$variant-$rep.serve.log" 2>/dev/null || true
  fi
  rm -f "$tmp/podman.out"
  if [ -n "$daemon_pid" ]; then
    served=$(awk '/^soci_store_layers_served / {print $2}' "$tmp/at_ready.metrics" 2>/dev/null || true)
    fetched=$(awk '/^soci_store_bytes_fetched_total / {print $2}' "$tmp/at_ready.metrics" 2>/dev/null || true)
    rss=$(cat "$tmp/at_ready.rss" 2>/dev/null || true)
    rss_end=$(awk '/VmHWM/ {print $2}' "/proc/$daemon_pid/status" 2>/dev/null || true)
  fi
  reset_graph "$ver"      # while the store still answers
  stop_daemon
  m=$(store_host "$ver"); mounts_under "$m" | grep -q . && umount_under "$m"
  grep -q " $m fuse" /proc/self/mounts && umount -l "$m"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ver" "$net" "$kind" "$variant" "$rep" "$ok" \
    "$ready_s" "$exit_s" "$pb" "$sb" "$sa" "$sl" "$per" "${served:-}" "${fetched:-}" "${rss:-}" "${rss_end:-}" >> "$out_tsv"
  log "podman $ver $net $kind${variant:+ $variant} rep $rep: ready $ready_s s (exit $exit_s s), podman $pb B, store $sb B"
  [ "$ok" = 1 ]
}
export NSF="$nsf" TMPD="$tmp"

set_net() {
  in_ns tc qdisc del dev lo root 2>/dev/null || true
  [ "$1" = shaped ] && in_ns tc qdisc add dev lo root tbf rate "$rate" burst 256kb latency 100ms
  return 0
}

kinds=(plain)
for v in "${zstd_variants[@]}"; do kinds+=("plain:$v"); done
for v in "${vnames[@]}"; do
  kinds+=("lazy:$v")
  for sv in "${svnames[@]}"; do kinds+=("lazy-$sv:$v"); done
done
log "image: $layer_sizes = $(echo "$image_bytes / 1000000" | bc -l | xargs printf '%.1f') MB; $reps rounds of: podman {$podmans} x {$nets} x {${kinds[*]}}"
t_start=$(now)
for rep in $(seq "$reps"); do
  for ver in $podmans; do
    for net in $nets; do
      set_net "$net"
      # Rotate the order every round so that no kind always runs first.
      n=${#kinds[@]}
      for ((i = 0; i < n; i++)); do
        k=${kinds[$(((i + rep + ver) % n))]}
        kind=${k%%:*}; variant=""; [[ "$k" == *:* ]] && variant=${k#*:}
        # A failed run is reported (and counted in the table) and tried once more (RETRIES).
        for ((try = 0; try <= ${RETRIES:-1}; try++)); do
          run_one "$ver" "$net" "$kind" "$variant" "$rep" && break
        done
      done
    done
  done
done
set_net unshaped
t_total=$(echo "$(now) - $t_start" | bc)
cp "$tmp/access.log" "${out_tsv%.tsv}.access.log"

# ---------------------------------------------------------------------------------------------
# Report.
zt=""; zl=""; for v in "${vnames[@]}"; do zt="$zt $v=${ztoc_bytes[$v]}"; zl="$zl$v: ${ztoc_layers[$v]:-?}; "; done
python3 - "$out_tsv" "$image_bytes" "$layer_sizes" "$pv4" "$pv5" "$rate" "$reps" "$t_total" "$zt" "${vnames[*]}" "$zl" <<'PY'
import csv, math, statistics, sys
path, image_bytes, layer_sizes, pv4, pv5, rate, reps, t_total, zt, vnames, zl = sys.argv[1:]
image_bytes = int(image_bytes)
ztoc = dict(kv.split("=") for kv in zt.split())
rows = list(csv.DictReader(open(path), delimiter="\t"))
pv = {"4": pv4, "5": pv5}
netname = {"shaped": f"{rate.replace('mbit', ' Mbit/s')}", "unshaped": "loopback"}
def f(x):
    try:
        v = float(x); return None if math.isnan(v) else v
    except (TypeError, ValueError):
        return None
def sel(ver, net, kind, variant):
    return [r for r in rows if r["podman"] == ver and r["net"] == net and r["kind"] == kind and r["variant"] == variant]
def med(rs, col):
    v = [f(r[col]) for r in rs if r["ok"] == "1" and f(r[col]) is not None]
    return (statistics.median(v), min(v), max(v)) if v else None
def secs(m):
    return f"{m[0]:.2f} s ({m[1]:.2f}–{m[2]:.2f})" if m else "n/a"
def mb(m, unit=1e6):
    return f"{m[0]/unit:.1f} MB ({m[1]/unit:.1f}–{m[2]/unit:.1f})" if m else "n/a"
def fails(rs):
    n = sum(1 for r in rs if r["ok"] != "1"); return f", {n} failed" if n else ""
combos = []
for ver in ("4", "5"):
    for net in ("shaped", "unshaped"):
        if any(r["podman"] == ver and r["net"] == net for r in rows):
            combos.append((ver, net))
lazykinds = sorted({(r["kind"], r["variant"]) for r in rows if r["kind"] != "plain"}, key=lambda k: (vnames.split().index(k[1]) if k[1] in vnames.split() else 99, k[0]))
print()
print(f"image: {layer_sizes} gzip = {image_bytes/1e6:.1f} MB; zTOCs: " + ", ".join(f"{v} {int(b)/1e6:.1f} MB" for v, b in ztoc.items()))
print(f"zTOCs per layer: {zl.strip().rstrip(';')}")
print(f"{reps} rounds, {len(rows)} runs in {float(t_total)/60:.1f} min; medians (min–max)")
print()
print("| measure | value | baseline (same run) | ratio | target |")
print("|---|---|---|---|---|")
for ver, net in combos:
    p = sel(ver, net, "plain", "")
    mp = med(p, "ready_s")
    for kind, variant in lazykinds:
        l = sel(ver, net, kind, variant)
        ml = med(l, "ready_s")
        # A zstd:chunked variant's baseline is the plain pull of that same image.
        own = sel(ver, net, "plain", variant)
        p, mp = (own, med(own, "ready_s")) if own else (sel(ver, net, "plain", ""), med(sel(ver, net, "plain", ""), "ready_s"))
        label = "lazy" + (f" (serve {kind[5:]})" if kind != "lazy" else "") + (f", {variant}" if len(vnames.split()) > 1 or variant != "default" else "")
        ratio = f"{mp[0]/ml[0]:.1f}x faster" if mp and ml else "n/a"
        tgt = ">= 5x" if net == "shaped" else "-"
        print(f"| time to ready, podman {pv[ver]}, {netname[net]} | {label}: {secs(ml)}{fails(l)} | plain pull + run: {secs(mp)}{fails(p)} | {ratio} | {tgt} |")
print()
print("Lazy runs, at the ready line (medians, min–max):")
print()
print("| podman, link, run | registry bytes, store | of which zTOCs/artifacts | registry bytes, podman | store layer requests | layers resolved | daemon peak RSS |")
print("|---|---|---|---|---|---|---|")
for ver, net in combos:
    for kind, variant in lazykinds:
        l = sel(ver, net, kind, variant)
        sb, sa, pb = med(l, "store_bytes"), med(l, "store_artifact_bytes"), med(l, "podman_bytes")
        sl, ls, rss = med(l, "store_layer_requests"), med(l, "layers_served"), med(l, "rss_hwm_kib_ready")
        def num(m): return f"{m[0]:.0f} ({m[1]:.0f}–{m[2]:.0f})" if m else "n/a"
        rs = f"{rss[0]/1024:.0f} MiB ({rss[1]/1024:.0f}–{rss[2]/1024:.0f})" if rss else "n/a"
        share = f" = {sb[0]/image_bytes:.3f} of the image" if sb else ""
        print(f"| {pv[ver]}, {netname[net]}, {kind} {variant} | {mb(sb)}{share} | {mb(sa)} | {mb(pb)} | {num(sl)} | {num(ls)} | {rs} |")
print()
print("Store bytes by ready per layer (median of all lazy runs of the kind): " + "; ".join(
    f"{k} {v}: " + " / ".join(f"{statistics.median(x)/1e6:.1f}" for x in zip(*[[int(b) for b in r["store_bytes_per_layer"].split("/")]
        for r in rows if r["kind"] == k and r["variant"] == v and r["ok"] == "1" and r["store_bytes_per_layer"]])) + " MB"
    for k, v in lazykinds))
print()
print("Plain runs: registry bytes (podman): " + "; ".join(
    f"{pv[v]} {netname[n]}: {mb(med(sel(v, n, 'plain', ''), 'podman_bytes'))}" for v, n in combos))
print()
print("Runs (ready s):")
for ver, net in combos:
    plains = sorted({("plain", r["variant"]) for r in rows if r["kind"] == "plain"})
    for kind, variant in plains + lazykinds:
        l = sel(ver, net, kind, variant)
        print(f"  podman {pv[ver]}, {netname[net]}, {kind} {variant}: " + " / ".join(r["ready_s"] if r["ok"] == "1" else "FAIL" for r in l))
print(f"\nall runs: {path}")
PY
