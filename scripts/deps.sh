#!/usr/bin/env bash
# Installs what Torpor needs on Debian 12: QEMU, image-building tools, networking tools, the
# protobuf compiler, and a Rust toolchain (via rustup) if there is none. Idempotent and quiet
# when everything is already there.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils          # the VMM and qemu-img (copy-on-write disks)
  mmdebstrap busybox-static cpio kmod e2fsprogs  # guest image: rootfs, initramfs, ext4
  iproute2 nftables conntrack         # per-sandbox namespaces, veth, tap, firewall, cutting connections
  dnsmasq-base bind9-dnsutils python3 # tests and `torpor bench network`: a small internet of their own
  openssl                             # tests and `torpor bench credentials`: a GitHub App key pair
  protobuf-compiler                   # the supervisor's gRPC contract
  build-essential pkg-config curl ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/deps.sh: run as root (sudo) — it installs packages and Torpor needs root to run sandboxes" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# `torpor image build` reads the kernel package from apt's lists.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "==> installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
