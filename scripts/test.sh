#!/usr/bin/env bash
# Runs every test: unit tests and the integration tests, which boot real microVMs (QEMU), create
# real network namespaces, taps and nftables rules, and use a real SQLite file. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

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
