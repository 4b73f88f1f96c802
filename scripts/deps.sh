#!/usr/bin/env bash
# Installs what Torpor needs on Debian 12: QEMU, image-building tools, networking tools, the
# protobuf compiler, and a Rust toolchain (via rustup) if there is none. Idempotent and quiet
# when everything is already there.
#
# A package being "installed" is not enough: a machine may come with a newer qemu-utils from
# backports, which conflicts with Debian's qemu-system-x86 (apt gives up, or removes qemu-img).
# So when QEMU is to be installed, the QEMU packages already there are brought to the release's
# own versions in the same transaction; packages that still fail together are installed one at a
# time; then every binary is checked, the package of a missing one installed again, and whatever
# is still missing is named and the script fails.
set -euo pipefail

# binary → the Debian package that provides it
BINARIES=(
  qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils          # the VMM; copy-on-write disks
  mmdebstrap:mmdebstrap busybox:busybox-static cpio:cpio           # guest image: rootfs, initramfs
  modinfo:kmod mkfs.ext4:e2fsprogs                                 # guest kernel modules, ext4
  ip:iproute2 nft:nftables conntrack:conntrack                     # namespaces, veth, tap, firewall
  dnsmasq:dnsmasq-base dig:bind9-dnsutils python3:python3         # tests and benches: a small internet
  openssl:openssl                                                  # tests and benches: a GitHub App key
  protoc:protobuf-compiler                                         # the supervisor's gRPC contract
  cc:build-essential make:build-essential pkg-config:pkg-config curl:curl
  fallocate:util-linux setpriv:util-linux nsenter:util-linux sysctl:procps
)
EXTRA_PACKAGES=(ca-certificates)

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/deps.sh: run as root (sudo) — it installs packages and Torpor needs root to run sandboxes" >&2
  exit 1
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
apt_install() {
  echo "==> installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "$@" >/dev/null
}

# Installed QEMU packages, as `package/<this release>`: installed alongside a new QEMU, they are
# brought to the versions that belong with it.
qemu_aligned() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || return 0
  dpkg-query -W -f='${Package} ${Status}\n' 'qemu-*' 2>/dev/null \
    | awk -v c="$codename" '/install ok installed/ && $1 != "qemu-system-x86" { print $1 "/" c }'
}

packages_of_missing() {
  local entry
  for entry in "${BINARIES[@]}"; do
    have "${entry%%:*}" || echo "${entry#*:}"
  done | sort -u
}

missing=()
for p in "${EXTRA_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
mapfile -t -O "${#missing[@]}" missing < <(packages_of_missing)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  if ! have qemu-system-x86_64; then
    mapfile -t -O "${#missing[@]}" missing < <(qemu_aligned)
  fi
  if ! apt_install "${missing[@]}"; then
    echo "==> installing them together failed; one at a time"
    for p in "${missing[@]}"; do
      apt_install "$p" || echo "==> $p did not install; checked below" >&2
    done
  fi
fi
# Installing one package can remove another's binary (see above): check again, one package at a time.
mapfile -t missing < <(packages_of_missing)
for p in "${missing[@]}"; do
  apt_install "$p" || true
done
still=()
for entry in "${BINARIES[@]}"; do
  have "${entry%%:*}" || still+=("${entry%%:*} (package ${entry#*:})")
done
if [ ${#still[@]} -gt 0 ]; then
  echo "scripts/deps.sh: still missing after installing: ${still[*]}" >&2
  echo "  try: apt-get install $(packages_of_missing | tr '\n' ' ')" >&2
  exit 1
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
