#!/usr/bin/env bash
# Makes (once) a Debian chroot with that suite's podman for the store's podman tests
# (../shared/docs/test-machine.md): trixie has podman 5.4, forky 5.8.
# Usage: .ci/podman-chroot.sh SUITE DIR
set -euo pipefail
SUITE="$1" R="$2"
if [ -x "$R/usr/bin/podman" ] && [ -x "$R/usr/sbin/runc" ]; then exit 0; fi
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
# The Debian mirror the host's apt already uses.
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "no Debian mirror in the host's apt sources" >&2; exit 1; }
[ -x "$R/usr/bin/podman" ] || rm -rf "$R"
# debootstrap may lack a script for the testing suite: sid's fits it.
script=()
[ -e "/usr/share/debootstrap/scripts/$SUITE" ] || script=(/usr/share/debootstrap/scripts/sid)
[ -x "$R/usr/bin/apt-get" ] ||
  debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR" "${script[@]}" >/dev/null
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
