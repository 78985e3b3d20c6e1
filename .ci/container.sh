#!/usr/bin/env bash
# The container image, built and run for real: a bookworm base made by mmdebstrap from Debian's
# packages (no registry can be reached), the runtime stage of deploy/container/Dockerfile built
# around the release binaries by podman, then run: health, a batch over the published port, an exec
# job whose leftovers PID 1 must reap, and `podman stop` mid-job: a clean drain and exit 0.
# Installs what it needs on a fresh Debian machine; caches the base image between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/batchd-base:bookworm
IMAGE=localhost/batchd:ci
NAME=batchd-ci-$$
# podman run on this kind of machine: runc (crun fails on its hybrid cgroups), explicit ulimits.
RUN_OPTS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

need=()
command -v podman >/dev/null || need+=(podman)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

t0=$SECONDS
cargo build --release --locked --quiet --bins
echo "release build: $((SECONDS - t0))s"

work=$(mktemp -d)
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The base: minbase bookworm with tini, no docs, with bookworm's updates (no CA certificates:
# batchd makes no TLS connection of its own).
if ! podman image exists "$BASE"; then
  t0=$SECONDS
  # merged-usr: /usr merged by the hook, not by the usrmerge package, which would pull in perl.
  mmdebstrap --quiet --variant=minbase --include=tini \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$work/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >"$work/mmdebstrap.log" 2>&1 \
    || { cat "$work/mmdebstrap.log"; echo "mmdebstrap failed" >&2; exit 1; }
  podman import --quiet "$work/base.tar" "$BASE" >/dev/null
  rm -f "$work/base.tar"
  echo "base image: $((SECONDS - t0))s"
fi

t0=$SECONDS
# --format docker: OCI images have no HEALTHCHECK.
podman build --quiet --pull=never --format docker \
  --target prebuilt --build-arg RUNTIME_IMAGE="$BASE" \
  -f deploy/container/Dockerfile -t "$IMAGE" . >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image build: $((SECONDS - t0))s, $IMAGE: $((size / 1000000)) MB"

[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" = 65532:65532 ] \
  || { echo "the image does not run as 65532" >&2; exit 1; }
[ "$(podman image inspect --format '{{.Config.StopSignal}}' "$IMAGE")" = SIGTERM ] \
  || { echo "STOPSIGNAL is not SIGTERM" >&2; exit 1; }
podman image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE" | grep '50052/tcp' >/dev/null \
  || { echo "the admin port is not exposed" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
admin_port=$(free_port)

# The image's default config plus an exec handler whose command leaves a process behind.
{ cat deploy/batchd.toml; cat <<'TOML'

[[exec]]
name = "leaves-a-child"
command = ["sh", "-c", "sleep 30 & echo started"]
kill_grace = "1s"
TOML
} >"$work/batchd.toml"
chmod 644 "$work/batchd.toml"

# (podman cannot schedule the HEALTHCHECK without systemd as PID 1 and says so; it is run by hand
# below.)
podman run -d --name "$NAME" "${RUN_OPTS[@]}" --read-only --cap-drop ALL --stop-timeout 45 \
  -p "127.0.0.1:$grpc_port:50051" -p "127.0.0.1:$admin_port:50052" \
  -v "$work/batchd.toml:/etc/batchd/batchd.toml:ro" --tmpfs /tmp "$IMAGE" >/dev/null 2>"$work/run.err" \
  || { cat "$work/run.err"; exit 1; }

endpoint=http://127.0.0.1:$grpc_port
batchctl=target/release/batchctl
logs() { podman logs "$NAME" 2>&1 | tail -40; }
fail() { echo "$*" >&2; logs; exit 1; }

ok=
for _ in $(seq 300); do
  if [ "$("$batchctl" --endpoint "$endpoint" health 2>/dev/null)" = SERVING ]; then ok=1; break; fi
  sleep 0.1
done
[ -n "$ok" ] || fail "no health over the published port"
podman healthcheck run "$NAME" || fail "HEALTHCHECK (batchctl health inside) failed"
[ "$(podman exec "$NAME" cat /proc/1/comm)" = tini ] || fail "PID 1 is not tini"
[ "$(podman exec "$NAME" id -u)" = 65532 ] || fail "not running as 65532"
exec 3<>"/dev/tcp/127.0.0.1/$admin_port"
printf 'GET /healthz HTTP/1.1\r\nHost: batchd\r\nConnection: close\r\n\r\n' >&3
head -1 <&3 | grep -q '200' || fail "/healthz over the published admin port"
exec 3<&-
echo "running: SERVING on the published port, HEALTHCHECK ok, PID 1 tini, uid 65532"

# A batch over the published port.
printf '%s\n' '{"id":"h","handler":"sha256","payload":"hello"}' \
  '{"id":"e","handler":"echo","payload":"batchd"}' \
  '{"id":"x1","handler":"leaves-a-child"}' '{"id":"x2","handler":"leaves-a-child"}' >"$work/jobs.jsonl"
"$batchctl" --endpoint "$endpoint" run --quiet "$work/jobs.jsonl" >"$work/results.jsonl" \
  || { cat "$work/results.jsonl"; fail "the batch did not end ok"; }
python3 - "$work/results.jsonl" <<'PY'
import base64, hashlib, json, sys
res = {r["id"]: r for r in map(json.loads, open(sys.argv[1]))}
assert all(r["outcome"] == "ok" for r in res.values()), res
digest = res["h"].get("output_b64") or base64.b64encode(res["h"]["output"].encode()).decode()
assert base64.b64decode(digest) == hashlib.sha256(b"hello").digest(), res["h"]
assert res["e"]["output"] == "batchd" and res["x1"]["output"] == "started\n", res
PY
echo "batch over the published port: 4 jobs ok, sha256 digest right"

# The exec jobs' leftover sleeps were killed after their results; tini must have reaped them.
zombies=
for _ in $(seq 100); do
  zombies=$(podman exec "$NAME" sh -c 'grep -l "^State:.*Z" /proc/[0-9]*/status 2>/dev/null || true')
  leftovers=$(podman exec "$NAME" sh -c 'grep -l "^Name:.*sleep" /proc/[0-9]*/status 2>/dev/null || true')
  [ -z "$zombies" ] && [ -z "$leftovers" ] && break
  sleep 0.1
done
[ -z "$zombies" ] || fail "zombies in the container: $zombies"
[ -z "$leftovers" ] || fail "exec leftovers still run: $leftovers"
echo "exec leftovers killed and reaped: no zombie"

# podman stop mid-job: the running job finishes within the grace, the call ends, exit 0.
echo '{"id":"slow","handler":"sleep","params":{"ms":3000},"payload":"done"}' >"$work/slow.jsonl"
"$batchctl" --endpoint "$endpoint" run --quiet "$work/slow.jsonl" >"$work/slow.out" 2>"$work/slow.err" &
client=$!
for _ in $(seq 300); do
  running=$(exec 3<>"/dev/tcp/127.0.0.1/$admin_port"; \
    printf 'GET /metrics HTTP/1.1\r\nHost: batchd\r\nConnection: close\r\n\r\n' >&3; \
    grep -E '^batchd_jobs_running\{handler="sleep"\} ' <&3 | awk '{print $2}')
  [ "${running:-0}" = 1 ] && break
  sleep 0.05
done
[ "${running:-0}" = 1 ] || fail "the slow job never ran"
t0=$SECONDS
podman stop -t 45 "$NAME" >/dev/null 2>&1
stopped=$((SECONDS - t0))
wait "$client" || { cat "$work/slow.out" "$work/slow.err"; fail "the call in flight did not end ok"; }
grep -q '"outcome":"ok"' "$work/slow.out" || fail "the running job did not finish: $(cat "$work/slow.out")"
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after podman stop"
podman logs "$NAME" 2>&1 | grep 'stopped' >/dev/null || fail "no 'stopped' in the log"
echo "podman stop mid-job: drained in ${stopped}s, job ok, exit 0"
