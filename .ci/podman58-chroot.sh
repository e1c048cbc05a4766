#!/usr/bin/env bash
# Makes (once) a Debian forky chroot with podman 5.8 for the store's podman-5.8 test
# (../shared/docs/test-machine.md). Usage: .ci/podman58-chroot.sh DIR
set -euo pipefail
R="$1"
if [ -x "$R/usr/bin/podman" ] && [ -x "$R/usr/sbin/runc" ]; then exit 0; fi
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
# The Debian mirror the host's apt already uses.
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "no Debian mirror in the host's apt sources" >&2; exit 1; }
[ -x "$R/usr/bin/podman" ] || rm -rf "$R"
# debootstrap has no forky script: sid's fits (forky is the testing suite).
[ -x "$R/usr/bin/apt-get" ] ||
  debootstrap --variant=minbase forky "$R" "$MIRROR" /usr/share/debootstrap/scripts/sid >/dev/null
cp /etc/resolv.conf "$R/etc/"
mounts=()
cleanup() { for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -R "${mounts[$i]}" 2>/dev/null || umount -l "${mounts[$i]}" || true; done; }
trap cleanup EXIT
mount -t proc proc "$R/proc"; mounts+=("$R/proc")
mount --bind /dev "$R/dev"; mounts+=("$R/dev")
# The mirror's Release files may be past their Valid-Until date.
chroot "$R" sh -c 'apt-get -o Acquire::Check-Valid-Until=false update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null'
"$R/usr/bin/podman" --version >/dev/null 2>&1 || chroot "$R" podman --version
