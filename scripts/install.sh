#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running Torpor daemon: dependencies, a
# release build, the guest image (skipped when up to date), then `torpor server`, checked by
# `torpor doctor` once it answers. Arguments go to `torpor server` (e.g. --listen ADDR; then
# set TORPOR_URL for the check to find it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "==> building (release)"
cargo build --release --workspace --quiet
install -m 0755 target/release/torpor target/release/torpor-bench target/release/torpor-guest /usr/local/bin/

echo "==> guest image"
torpor image build

echo "==> starting torpor server on 127.0.0.1:7070 (data in ${TORPOR_HOME:-/var/lib/torpor})"
torpor server "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM
echo "==> torpor doctor"
if ! torpor doctor --wait 60; then
  echo "==> torpor doctor found problems (above, each with what to run); the server keeps running" >&2
fi
wait "$server"
