#!/usr/bin/env bash
# Upgrade check: sandboxes made by an older torpor (one running, one paused, each with a file
# and a process) are adopted by a newer one started on the same data directory: the running one
# keeps running with its process, the paused one resumes with its file and its process.
#
#   scripts/upgrade-check.sh OLD_TORPOR NEW_TORPOR
#
# Build the old binary from its commit, e.g.:
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release -p torpor)
# Needs root and a built guest image. Leaves nothing behind.
set -euo pipefail
old=$1 new=$2
home=$(mktemp -d /tmp/torpor-upgrade-XXXXXX)
port=17950
cat > "$home/config.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$home"
address_pool = "10.231.0.0/16"
vm_uid_base = 1500000000
CONF
export TORPOR_URL="http://127.0.0.1:$port"
pid=
start() {
  "$1" server --config "$home/config.toml" >>"$home/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    # The key as a value: older CLIs know no key file variable.
    curl -sf "$TORPOR_URL/v1/health" >/dev/null 2>&1 && { TORPOR_API_KEY=$(cat "$home/api-key"); export TORPOR_API_KEY; return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$home/server.log"; echo "the daemon ($1) exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "the daemon ($1) did not answer" >&2; exit 1
}
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  for dir in "$home"/sandboxes/*; do
    [ -d "$dir" ] || continue
    id=$(basename "$dir")
    for p in $(cat "/sys/fs/cgroup/memory/torpor/torpor-$id/cgroup.procs" 2>/dev/null); do kill -9 "$p" || true; done
    ip link del "tv$id" 2>/dev/null || true
    ip netns del "torpor-$id" 2>/dev/null || true
  done
  rm -rf "$home"
}
trap cleanup EXIT
prepare='echo kept > /root/upgrade; setsid sleep 100000 >/dev/null 2>&1 < /dev/null & echo $! > /root/pid'
check='test "$(cat /root/upgrade)" = kept && kill -0 "$(cat /root/pid)" && echo ok'

echo "==> the old daemon: $("$old" --version)"
start "$old"
running=$("$old" sandbox create --idle-timeout 0)
paused=$("$old" sandbox create --idle-timeout 0)
"$old" sandbox exec "$running" -- sh -c "$prepare"
"$old" sandbox exec "$paused" -- sh -c "$prepare"
"$old" sandbox pause "$paused"
kill "$pid"; wait "$pid" || true

echo "==> the new daemon: $("$new" --version)"
start "$new"
if ! "$new" sandbox get "$running" | grep -q 'state: *running'; then
  "$new" sandbox get "$running"; tail -n 30 "$home/server.log"; exit 1
fi
[ "$("$new" sandbox exec "$running" -- sh -c "$check")" = ok ]
echo "running sandbox adopted: its file and its process are there"
"$new" sandbox resume "$paused"
[ "$("$new" sandbox exec "$paused" -- sh -c "$check")" = ok ]
echo "paused sandbox resumed: its file and its process are there"
"$new" sandbox rm "$running" && "$new" sandbox rm "$paused"
echo "upgrade check passed"
