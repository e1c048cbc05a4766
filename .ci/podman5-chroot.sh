#!/usr/bin/env bash
# Makes (once) a Debian 13 chroot with podman 5 for the store's podman-5 test
# (../shared/docs/test-machine.md). Usage: .ci/podman5-chroot.sh DIR
set -euo pipefail
R="$1"
if [ -x "$R/usr/bin/podman" ] && [ -x "$R/usr/sbin/runc" ]; then exit 0; fi
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
[ -x "$R/usr/bin/podman" ] || rm -rf "$R"
[ -x "$R/usr/bin/apt-get" ] || debootstrap --variant=minbase trixie "$R" "$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)" >/dev/null
cp /etc/resolv.conf "$R/etc/"
mounts=()
cleanup() { for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -R "${mounts[$i]}" 2>/dev/null || umount -l "${mounts[$i]}" || true; done; }
trap cleanup EXIT
mount -t proc proc "$R/proc"; mounts+=("$R/proc")
mount --bind /dev "$R/dev"; mounts+=("$R/dev")
chroot "$R" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null'
"$R/usr/bin/podman" --version >/dev/null 2>&1 || chroot "$R" podman --version
