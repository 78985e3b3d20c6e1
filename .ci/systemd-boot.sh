#!/usr/bin/env bash
# deploy/systemd under a real systemd: systemd 252 booted as PID 1 in a podman container (this
# machine's own PID 1 is not systemd), batchd.socket and batchd.service installed and enabled as
# README.md says. Checks: socket activation and READY (active, STATUS line), exec handlers working
# inside the full sandbox (dynamic user, private /tmp, read-only /etc, leftovers reaped), exec jobs
# in cgroup mode under Delegate=yes (the mode logged and exported, a job inside its own cgroup below
# the unit's and unable to leave it, a `setsid` grandchild of a cancelled job gone, where
# process-group mode leaves it), a real wedge (journald stopped, so batchd's log writes block)
# ending in a watchdog restart, and `systemctl stop` mid-job draining to a clean exit. Installs
# what it needs; caches the base image.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/batchd-systemd-base:bookworm
# Per run: another run of this script on the machine must not retag the image this one boots.
IMAGE=localhost/batchd-systemd:ci-$$
NAME=batchd-systemd-ci-$$
RUN_OPTS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

need=()
command -v podman >/dev/null || need+=(podman)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --locked --quiet --bin batchd --bin batchctl

work=$(mktemp -d)
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! podman image exists "$BASE"; then
  t0=$SECONDS
  mmdebstrap --quiet --variant=minbase --include=systemd,systemd-sysv,dbus,procps \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$work/base.tar" >"$work/mmdebstrap.log" 2>&1 \
    || { cat "$work/mmdebstrap.log"; echo "mmdebstrap failed" >&2; exit 1; }
  podman import --quiet "$work/base.tar" "$BASE" >/dev/null
  rm -f "$work/base.tar"
  echo "systemd base image: $((SECONDS - t0))s"
fi

# The files where README.md installs them, and exec handlers that probe the sandbox.
ctx=$work/ctx
mkdir -p "$ctx"
cp target/debug/batchd target/debug/batchctl deploy/systemd/batchd.service deploy/systemd/batchd.socket "$ctx/"
{ cat deploy/batchd.toml; cat <<'TOML'

[[exec]]
name = "whoami"
command = ["id", "-u"]

[[exec]]
name = "write-tmp"
command = ["sh", "-c", "echo scratch > /tmp/x && cat /tmp/x"]

[[exec]]
name = "write-etc"
command = ["sh", "-c", "echo no > /etc/batchd-was-here"]

[[exec]]
name = "leaves-a-child"
command = ["sh", "-c", "sleep 30 & echo started"]
kill_grace = "1s"

[[exec]]
name = "cgroup-of"
command = ["cat", "/proc/self/cgroup"]

# A command that tries to move itself out of its job's cgroup, into the unit's slice.
[[exec]]
name = "leave-cgroup"
command = ["sh", "-c", '''
cg=$(sed -n "s/^0:://p" /proc/self/cgroup)
mnt=$(sed -n "s#^[0-9]* [0-9]* [^ ]* / \([^ ]*\) .* - cgroup2 .*#\1#p" /proc/self/mountinfo | head -1)
echo $$ >"$mnt${cg%%/batchd.service/*}/cgroup.procs" && echo "moved to ${cg%%/batchd.service/*}"
''']

# Grandchildren that leave the job's process group; only a cgroup holds them.
[[exec]]
name = "escape"
command = ["sh", "-c", "setsid sleep 601 & exec sleep 600"]
kill_grace = "1s"

[[exec]]
name = "escape-pg"
command = ["sh", "-c", "setsid sleep 602 & exec sleep 600"]
isolation = "process-group"
kill_grace = "1s"
TOML
} >"$ctx/batchd.toml"
cat >"$ctx/Containerfile" <<EOF2
FROM $BASE
COPY batchd batchctl /usr/local/bin/
COPY batchd.toml /etc/batchd/batchd.toml
COPY batchd.service batchd.socket /etc/systemd/system/
RUN systemctl enable batchd.socket batchd.service
CMD ["/sbin/init"]
EOF2
podman build --quiet --pull=never -t "$IMAGE" "$ctx" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

# Privileged: systemd needs to set up the unit's namespaces, mounts and seccomp filter itself.
podman run -d --name "$NAME" "${RUN_OPTS[@]}" --systemd=always --privileged "$IMAGE" >/dev/null 2>"$work/run.err" \
  || { cat "$work/run.err"; exit 1; }
inside() { podman exec "$NAME" "$@"; }
fail() {
  echo "$*" >&2
  inside journalctl -u batchd --no-pager 2>/dev/null | grep -v ' TRACE \| DEBUG ' | tail -30
  exit 1
}
show() { inside systemctl show batchd -p "$1" --value; }
# The admin listener's /metrics, in Prometheus text format.
metrics() {
  inside bash -c 'exec 3<>/dev/tcp/127.0.0.1/50052
    printf "GET /metrics HTTP/1.1\r\nHost: batchd\r\nConnection: close\r\n\r\n" >&3
    cat <&3'
}
# Pids of the container's processes whose whole command line is exactly "$1".
procs() { inside pgrep -x -f "$1" || true; }

state=
for _ in $(seq 600); do
  state=$(inside systemctl is-system-running 2>/dev/null || true)
  [ "$state" = running ] || [ "$state" = degraded ] && break
  sleep 0.1
done
[ "$(inside systemctl is-active batchd.socket batchd.service | tr '\n' ' ')" = "active active " ] \
  || fail "batchd.socket/batchd.service are not active (system: $state)"
[[ "$(show StatusText)" == "serving: "* ]] || fail "status: $(show StatusText)"
[ "$(show WatchdogUSec)" = 10s ] || fail "watchdog: $(show WatchdogUSec)"
inside journalctl -u batchd --no-pager | grep "socket activation" >/dev/null || fail "not socket-activated"
echo "booted: batchd.socket and batchd.service active, status \"$(show StatusText)\""

# Exec handlers inside the sandbox.
inside sh -c 'printf "%s\n" "{\"id\":\"h\",\"handler\":\"sha256\",\"payload\":\"hello\"}" \
  "{\"id\":\"u\",\"handler\":\"whoami\"}" "{\"id\":\"t\",\"handler\":\"write-tmp\"}" \
  "{\"id\":\"e\",\"handler\":\"write-etc\"}" "{\"id\":\"c\",\"handler\":\"leaves-a-child\"}" \
  | batchctl run --quiet -' >"$work/results.jsonl" || true
result() { grep "\"id\":\"$1\"" "${2:-$work/results.jsonl}" || true; }
result h | grep -q '"output_b64":"LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="' || fail "sha256: $(result h)"
uid=$(result u | sed -n 's/.*"output":"\([0-9]*\)\\n".*/\1/p')
[ -n "$uid" ] && [ "$uid" != 0 ] || fail "exec commands must run as the dynamic user: $(result u)"
result t | grep -q '"outcome":"ok","output":"scratch\\n"' || fail "private /tmp: $(result t)"
result e | grep -q 'Read-only file system' || fail "/etc must be read-only: $(result e)"
result c | grep -q '"outcome":"ok"' || fail "leaves-a-child: $(result c)"
for _ in $(seq 100); do
  left=$(inside sh -c 'grep -lE "^State:.*Z|^Name:.*sleep" /proc/[0-9]*/status 2>/dev/null || true')
  [ -z "$left" ] && break
  sleep 0.1
done
[ -z "$left" ] || fail "exec leftovers or zombies: $left"
echo "exec handlers in the sandbox: uid $uid, private /tmp, read-only /etc, leftovers reaped"

# Cgroup mode under the unit (Delegate=yes): logged at start-up, exported, and in force for a job.
inside journalctl -u batchd --no-pager | grep "exec isolation: a cgroup per job" >/dev/null \
  || fail "batchd does not run exec jobs in cgroup mode under the unit"
metrics >"$work/metrics.txt"
grep -qx 'batchd_exec_isolation{mode="cgroup"} 1' "$work/metrics.txt" \
  || fail "metrics: $(grep exec_isolation "$work/metrics.txt")"
inside sh -c 'printf "%s\n" "{\"id\":\"g\",\"handler\":\"cgroup-of\"}" "{\"id\":\"l\",\"handler\":\"leave-cgroup\"}" \
  | batchctl run --quiet -' >"$work/cgroups.jsonl" || true
# The job's own cgroup: <the unit's cgroup>/batchd-<pid>-<start>-<pid ns>/job-<n>.
job_cgroup=$(result g "$work/cgroups.jsonl" | sed -n 's#.*0::\([^\\]*/system\.slice/batchd\.service/batchd-[0-9-]*/job-[0-9]*\)\\n.*#\1#p')
[ -n "$job_cgroup" ] || fail "the job is not in a cgroup of its own below batchd.service: $(result g "$work/cgroups.jsonl")"
# Only the unit's subtree is the service's: the rest of the tree is root's (no ProtectControlGroups).
left=$(result l "$work/cgroups.jsonl")
[[ "$left" == *'"outcome":"failed"'*'cgroup.procs: Permission denied'* ]] || fail "a job left its cgroup: $left"

# A cancelled job takes its setsid grandchild with it; in process-group mode the grandchild escapes.
inside sh -c 'printf "%s\n" "{\"id\":\"cg\",\"handler\":\"escape\"}" "{\"id\":\"pg\",\"handler\":\"escape-pg\"}" \
  | batchctl run --quiet - >/tmp/escape.out 2>&1 & echo $! >/tmp/escape.pid'
for _ in $(seq 200); do
  [ -n "$(procs 'sleep 601')" ] && [ -n "$(procs 'sleep 602')" ] && break
  sleep 0.05
done
grandchild=$(procs 'sleep 601')
[ -n "$grandchild" ] && [ -n "$(procs 'sleep 602')" ] || fail "the escaping jobs did not start"
sid=$(inside ps -o sid= -p "$grandchild" | tr -d ' ')
[ "$sid" = "$grandchild" ] || fail "sleep 601 did not leave its job's session (session $sid)"
grandchild_cgroup=$(inside sed -n 's/^0:://p' "/proc/$grandchild/cgroup")
[[ "$grandchild_cgroup" == */system.slice/batchd.service/batchd-*/job-* ]] \
  || fail "the grandchild is not in its job's cgroup: $grandchild_cgroup"
# Ctrl-C: batchctl cancels its call, and batchd stops the call's jobs.
inside sh -c 'kill -INT $(cat /tmp/escape.pid)
  for i in $(seq 200); do kill -0 $(cat /tmp/escape.pid) 2>/dev/null || exit 0; sleep 0.05; done; exit 1' \
  || fail "batchctl did not stop on SIGINT"
for _ in $(seq 200); do
  [ -z "$(procs 'sleep 601')" ] && [ -z "$(procs 'sleep 600')" ] && break
  sleep 0.05
done
[ -z "$(procs 'sleep 601')" ] || fail "the setsid grandchild of the cancelled job (cgroup mode) is still there"
[ -z "$(procs 'sleep 600')" ] || fail "a cancelled job's command is still there"
escaped=$(procs 'sleep 602')
[ -n "$escaped" ] || fail "process-group mode: the setsid grandchild is gone too (was the job ever in that mode?)"
inside kill -KILL $escaped
# Where the cgroup2 hierarchy's root is mounted (/sys/fs/cgroup/unified in this hybrid layout).
root=$(inside sh -c "sed -n 's#^[0-9]* [0-9]* [^ ]* / \([^ ]*\) .* - cgroup2 .*#\1#p' /proc/1/mountinfo | head -1")
inside test -d "$root$(dirname "$job_cgroup")" || fail "no cgroup2 mount shows the jobs' cgroups (root: $root)"
for _ in $(seq 100); do
  inside test -e "$root$grandchild_cgroup" || break
  sleep 0.05
done
if inside test -e "$root$grandchild_cgroup"; then fail "the cancelled job's cgroup $grandchild_cgroup is still there"; fi
echo "cgroup mode under Delegate=yes: logged, exported, job in $job_cgroup (and it cannot leave it);" \
  "cancelled: setsid grandchild gone, its cgroup removed (in process-group mode it escaped)"

# A real wedge: journald stopped, batchd logs every frame (trace), so its log writes block once
# the journal's socket is full; the watchdog pings stop and systemd restarts it.
inside sh -c 'mkdir -p /etc/systemd/system/batchd.service.d && printf "[Service]\nEnvironment=BATCHD_LOG=trace BATCHD_STALL_TIMEOUT=2s\nWatchdogSec=4s\n" \
  >/etc/systemd/system/batchd.service.d/wedge.conf && systemctl daemon-reload && systemctl restart batchd'
before=$(show MainPID)
inside sh -c 'J=$(pidof systemd-journald); kill -STOP $J
  n=0; for i in $(seq 2000); do timeout 1 batchctl health >/dev/null 2>&1 || n=$((n+1)); [ $n -ge 3 ] && break; done
  for i in $(seq 300); do [ "$(systemctl show batchd -p NRestarts --value)" -ge 1 ] && break; sleep 0.1; done
  kill -CONT $J'
[ "$(show NRestarts)" -ge 1 ] || fail "no watchdog restart of the wedged daemon"
# journald, just resumed, catches up with what was queued for it meanwhile.
seen=
for _ in $(seq 100); do
  inside journalctl -u batchd --no-pager | grep "Watchdog timeout" >/dev/null && { seen=1; break; }
  sleep 0.1
done
[ -n "$seen" ] || fail "no watchdog timeout in the journal"
after=$(show MainPID)
[ "$after" != "$before" ] || fail "same main pid after the restart"
ok=
for _ in $(seq 100); do
  [ "$(inside timeout 2 batchctl health 2>/dev/null)" = SERVING ] && { ok=1; break; }
  sleep 0.1
done
[ -n "$ok" ] || fail "the restarted daemon does not serve"
echo "wedged (journald stopped): watchdog timeout, restarted (pid $before -> $after), serving"
inside sh -c 'rm /etc/systemd/system/batchd.service.d/wedge.conf && systemctl daemon-reload && systemctl restart batchd'

# systemctl stop mid-job: the job finishes, the daemon exits 0.
inside sh -c 'echo "{\"id\":\"slow\",\"handler\":\"sleep\",\"params\":{\"ms\":3000},\"payload\":\"done\"}" \
  | batchctl run --quiet - >/tmp/slow.out 2>&1 & echo $! >/tmp/client.pid'
# Running once the admin /metrics says so (the STATUS line is refreshed only every few seconds).
running() { metrics | awk '/^batchd_jobs_running\{handler="sleep"\} / { print $2 }'; }
for _ in $(seq 100); do
  [ "$(running)" = 1 ] && break
  sleep 0.05
done
[ "$(running)" = 1 ] || fail "the slow job never ran"
inside systemctl stop batchd
inside sh -c 'while kill -0 $(cat /tmp/client.pid) 2>/dev/null; do sleep 0.1; done; cat /tmp/slow.out' >"$work/slow.out"
grep -q '"outcome":"ok"' "$work/slow.out" || fail "the running job did not finish: $(cat "$work/slow.out")"
[ "$(show Result)" = success ] && [ "$(show ExecMainStatus)" = 0 ] \
  || fail "stop: result $(show Result), status $(show ExecMainStatus)"
echo "systemctl stop mid-job: job ok, result success, exit 0"
