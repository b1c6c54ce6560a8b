#!/bin/sh
# Build a minimal Debian root filesystem with python3 into TARGET.
#
# Usage: debian.sh SUITE TARGET MIRROR
#   SUITE   Debian codename, e.g. bookworm
#   TARGET  empty directory to build in
#   MIRROR  Debian archive URL, e.g. the deb URL of /etc/apt/sources.list
#
# Run as root. `engine image build debian` runs this script in a private mount
# namespace, so the /proc and /sys mounts that debootstrap makes inside TARGET
# never reach the host's mount table, and then shifts the ownership of every
# file into the sandbox uid range. Lines starting with "I: " are progress steps.
set -eu

if [ "$#" -ne 3 ]; then
	echo "E: usage: $0 SUITE TARGET MIRROR" >&2
	exit 2
fi
suite=$1
target=$2
mirror=$3

command -v debootstrap >/dev/null 2>&1 || {
	echo "E: debootstrap not found; install it with: apt-get install debootstrap" >&2
	exit 1
}

umask 022
debootstrap --variant=minbase --include=python3 "$suite" "$target" "$mirror"

echo "I: Cleaning the apt cache"
chroot "$target" apt-get clean
# The package lists are about 50 MB, and apt-get update rebuilds them.
find "$target"/var/lib/apt/lists -maxdepth 1 -type f -delete

# debootstrap copies these from the host. The runtime writes its own
# /etc/hostname, /etc/hosts and /etc/resolv.conf into each sandbox.
echo "I: Removing host files and device nodes"
rm -f "$target"/etc/hostname "$target"/etc/resolv.conf
# The runtime mounts its own /dev, and the image is mounted nodev anyway.
find "$target" -xdev \( -type b -o -type c \) -delete

echo "I: Recipe finished"
