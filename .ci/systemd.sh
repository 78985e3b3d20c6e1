#!/usr/bin/env bash
# The systemd units: `systemd-analyze verify` (unknown keys fail), the security exposure score
# (at most 2.5, "OK"), and socket activation by systemd's own systemd-socket-activate with the
# real daemon. Installs what it needs on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=2.5

if ! command -v systemd-analyze >/dev/null || ! command -v systemd-socket-activate >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

cargo build --locked --quiet --bin batchd --bin batchctl
bin=$PWD/target/debug

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# verify fails when ExecStart's binary does not exist: a copy of the units pointing at the build.
cp deploy/systemd/batchd.service deploy/systemd/batchd.socket "$work/"
sed -i "s#^ExecStart=/usr/local/bin/batchd#ExecStart=$bin/batchd#" "$work/batchd.service"
grep -q "^ExecStart=$bin/batchd " "$work/batchd.service"
# Without SYSTEMD_LOG_LEVEL=warning, unknown keys are not even printed; any output is a failure.
out=$(cd "$work" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify ./batchd.socket ./batchd.service 2>&1) || {
  echo "$out"; echo "systemd-analyze verify failed" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify complained" >&2; exit 1; fi
echo "systemd-analyze verify: batchd.service, batchd.socket OK"

report=$(cd "$work" && systemd-analyze security --offline=true ./batchd.service)
score=$(sed -n 's/.*Overall exposure level for batchd.service: \([0-9.]*\).*/\1/p' <<<"$report")
if [ -z "$score" ]; then echo "$report"; echo "no exposure score" >&2; exit 1; fi
echo "systemd-analyze security: exposure $score (at most $MAX_EXPOSURE)"
if ! awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
  grep '✗' <<<"$report" || true
  echo "exposure $score is above $MAX_EXPOSURE" >&2
  exit 1
fi

# Socket activation by systemd's tool: it binds, passes the socket as fd 3 named "grpc", and sets
# LISTEN_PID to the daemon's pid. `--listen` names a port that is taken, so only the passed socket
# can serve.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
systemd-socket-activate -l "127.0.0.1:$port" --fdname=grpc \
  "$bin/batchd" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 2>"$work/batchd.log" &
pid=$!
for _ in $(seq 300); do grep -q "^Listening on" "$work/batchd.log" && break; sleep 0.1; done
grep -q "^Listening on" "$work/batchd.log" || { cat "$work/batchd.log"; exit 1; }
# systemd-socket-activate accepts nothing itself: the first call starts batchd, which must answer it.
status=$(timeout 30 "$bin/batchctl" --endpoint "http://127.0.0.1:$port" health) || {
  cat "$work/batchd.log"; echo "no health answer through socket activation" >&2; exit 1; }
[ "$status" = SERVING ] || { echo "health: $status" >&2; exit 1; }
grep -q "socket activation" "$work/batchd.log" || { cat "$work/batchd.log"; exit 1; }
kill -TERM "$pid"
wait "$pid"
pid=
echo "socket activation with systemd-socket-activate: SERVING, clean exit"
