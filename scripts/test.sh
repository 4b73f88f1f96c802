#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests, which boot real microVMs (QEMU), create
# real network namespaces, taps and nftables rules, and use a real SQLite file. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

# The checks that keep the code as the project wants it: formatting, lints (warnings are errors),
# and what may be linked in (licences, sources, duplicate or wildcard versions). Their tools are
# installed here on a fresh machine, and their binaries checked.
echo "==> lint tools"
cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 \
  || rustup component add rustfmt clippy
cargo deny --version >/dev/null 2>&1 || cargo install --locked --quiet cargo-deny
for tool in fmt clippy deny; do
  cargo "$tool" --version >/dev/null 2>&1 || { echo "cargo $tool is missing after installing it" >&2; exit 1; }
done
# `cargo deny --offline` below reads the crates' metadata from the local registry.
cargo fetch --quiet
echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo deny"
cargo deny --offline check licenses bans sources
# The advisory database comes from GitHub; a host that cannot reach it says so rather than
# passing silently.
if timeout 60 git ls-remote https://github.com/RustSec/advisory-db >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "cargo deny: advisories NOT checked (the RustSec database on github.com is unreachable from this host)"
fi

echo "==> building"
cargo build --workspace --all-targets --quiet

# The guest image carries this build's torpor-guest; it is cached by content hash, so this is a
# no-op when nothing it depends on changed.
echo "==> guest image"
./target/debug/torpor image build

echo "==> tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --no-fail-fast ${TORPOR_TEST_THREADS:+-- --test-threads="$TORPOR_TEST_THREADS"} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
