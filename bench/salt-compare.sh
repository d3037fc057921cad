#!/usr/bin/env bash
# Side by side with Salt: a salt-master and N minions on loopback, `salt '*' test.ping` and
# `salt '*' cmd.run /bin/true` to all N, then Stella's `fanout` with N agents; prints both and
# their ratio.
#
#   bench/salt-compare.sh N            (default N=100)
#
# Environment: SALT_HOME (default /tmp/stella-salt: venv, download, master and minion dirs),
# RUNS (default 5: each measurement is the median of RUNS), STELLA_BENCH (default
# target/release/stella-bench), STELLA_BIN (the plane binary; default: `stella` next to
# stella-bench), KEEP=1 keeps the master/minion directories.
# Salt is installed in a venv exactly as /work/shared/design/PEERS.md ("Salt") says: salt 3006.30
# (LTS) with certifi relaxed, since every release pins a certifi the registry does not have.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-100}
RUNS=${RUNS:-5}
SALT_HOME=${SALT_HOME:-/tmp/stella-salt}
VENV=$SALT_HOME/venv
DL=$SALT_HOME/dl
STELLA_BENCH=${STELLA_BENCH:-target/release/stella-bench}
WORK=$SALT_HOME/run-$$
PUB=$((41000 + RANDOM % 2000))
RET=$((PUB + 1))

log() { echo "salt-compare: $*" >&2; }

if ! [ -x "$STELLA_BENCH" ]; then
  log "no $STELLA_BENCH: cargo build --release --bins -p stella-control-plane -p stella-bench"
  exit 1
fi

# --- Install Salt (recipe from PEERS.md, followed exactly) -------------------------------------
if ! [ -x "$VENV/bin/salt-master" ]; then
  log "installing salt 3006.30 into $VENV"
  mkdir -p "$DL"
  python3 -m venv "$VENV"
  (
    cd "$DL"
    "$VENV/bin/pip" download --no-deps -d . salt==3006.30
    tar xzf salt-3006.30.tar.gz
    sed -i 's/^certifi>=2026.10.23/certifi>=2024.2.2/' salt-3006.30/requirements/base.txt
    sed 's/^certifi==.*/certifi==2026.10.19.post1/' salt-3006.30/requirements/static/pkg/py3.11/linux.lock > lock.txt
    "$VENV/bin/pip" install -c lock.txt ./salt-3006.30
  )
fi
"$VENV/bin/salt" --version >&2

# --- Master and minions -------------------------------------------------------------------------
PGIDS=()
cleanup() {
  for pg in "${PGIDS[@]}"; do
    kill -KILL -- "-$pg" 2>/dev/null || true   # the whole process group: master workers hold ports
  done
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT

mkdir -p "$WORK/master/etc/salt"
cat > "$WORK/master/etc/salt/master" <<CONF
root_dir: $WORK/master
interface: 127.0.0.1
publish_port: $PUB
ret_port: $RET
auto_accept: True
user: root
worker_threads: 5
CONF
setsid "$VENV/bin/salt-master" -c "$WORK/master/etc/salt" -l warning >"$WORK/master.log" 2>&1 &
MASTER_PID=$!
PGIDS+=("$MASTER_PID")
log "salt-master pid $MASTER_PID (publish $PUB, ret $RET)"
sleep 5

MINION_PIDS=()
log "starting $N minions, 0.3 s apart"
for i in $(seq 1 "$N"); do
  id=$(printf 'm-%05d' "$i")
  d=$WORK/minion-$i
  mkdir -p "$d/etc/salt"
  cat > "$d/etc/salt/minion" <<CONF
id: $id
master: 127.0.0.1
master_port: $RET
publish_port: $PUB
root_dir: $d
user: root
multiprocessing: False
CONF
  setsid "$VENV/bin/salt-minion" -c "$d/etc/salt" --disable-keepalive -l warning >"$d/minion.log" 2>&1 &
  MINION_PIDS+=("$!")
  PGIDS+=("$!")
  sleep 0.3
done

SALT=("$VENV/bin/salt" -c "$WORK/master/etc/salt")
log "waiting until test.ping counts $N minions"
deadline=$((SECONDS + 900))
while :; do
  up=$("${SALT[@]}" '*' test.ping -t 3 --out=txt 2>/dev/null | grep -c ': True' || true)
  log "  $up/$N minions answer"
  [ "$up" -ge "$N" ] && break
  if [ $SECONDS -gt $deadline ]; then log "minions did not all come up"; exit 1; fi
  sleep 5
done

# Sum of utime+stime (ticks) and PSS-free RSS (KiB) over a list of process groups.
group_stats() {
  python3 - "$@" <<'PY'
import os, sys
groups = set(int(g) for g in sys.argv[1:])
ticks = rss = 0
for pid in os.listdir('/proc'):
    if not pid.isdigit():
        continue
    try:
        stat = open(f'/proc/{pid}/stat').read()
        fields = stat.rsplit(')', 1)[1].split()
        if int(fields[2]) not in groups:   # field 5: pgrp
            continue
        ticks += int(fields[11]) + int(fields[12])
        for line in open(f'/proc/{pid}/status'):
            if line.startswith('VmRSS:'):
                rss += int(line.split()[1])
    except (OSError, IndexError, ValueError):
        continue
print(ticks, rss)
PY
}

TICK=$(getconf CLK_TCK)
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# measure NAME CMD... : median wall ms over RUNS, all N must answer each time.
measure() {
  local name=$1; shift
  local times=() cpu_m=0 cpu_f=0
  for r in $(seq 1 "$RUNS"); do
    read -r m0 _ < <(group_stats "$MASTER_PID")
    read -r f0 _ < <(group_stats "${MINION_PIDS[@]}")
    local t0 t1 out
    t0=$(date +%s%N)
    out=$("$@" 2>/dev/null || true)
    t1=$(date +%s%N)
    read -r m1 _ < <(group_stats "$MASTER_PID")
    read -r f1 _ < <(group_stats "${MINION_PIDS[@]}")
    local answered
    answered=$(printf '%s' "$out" | python3 -c '
import json, sys
text = sys.stdin.read()
try:
    print(len(json.loads(text)))
except ValueError:
    print(sum(1 for l in text.splitlines() if l.endswith(": True")))')
    local ms=$(( (t1 - t0) / 1000000 ))
    log "  $name run $r: ${ms} ms, $answered/$N answered"
    if [ "$answered" -lt "$N" ]; then log "$name: only $answered of $N minions answered"; exit 1; fi
    times+=("$ms")
    cpu_m=$((cpu_m + m1 - m0)); cpu_f=$((cpu_f + f1 - f0))
  done
  local med
  med=$(printf '%s\n' "${times[@]}" | median)
  echo "$med $(python3 -c "print(round($cpu_m/$TICK/$RUNS, 2), round($cpu_f/$TICK/$RUNS, 2))")"
}

log "measuring salt '*' test.ping ($RUNS runs)"
res=$(measure test.ping "${SALT[@]}" '*' test.ping -t 120 --out=txt)
read -r PING_MS PING_MCPU PING_FCPU <<<"$res"
log "measuring salt '*' cmd.run /bin/true ($RUNS runs)"
res=$(measure cmd.run "${SALT[@]}" '*' cmd.run /bin/true -t 120 --out=json --static)
read -r RUN_MS RUN_MCPU RUN_FCPU <<<"$res"
read -r _ MASTER_RSS < <(group_stats "$MASTER_PID")
read -r _ MINIONS_RSS < <(group_stats "${MINION_PIDS[@]}")
log "stopping Salt"
for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
PGIDS=()
sleep 2

log "measuring Stella fanout with $N agents ($RUNS rounds)"
STELLA_JSON=$("$STELLA_BENCH" fanout --agents "$N" --rounds "$RUNS" --json)
echo "$STELLA_JSON" > "$SALT_HOME/stella-fanout-$N.json"

python3 - "$N" "$RUNS" "$PING_MS" "$PING_MCPU" "$PING_FCPU" "$RUN_MS" "$RUN_MCPU" "$RUN_FCPU" \
  "$MASTER_RSS" "$MINIONS_RSS" "$STELLA_JSON" <<'PY'
import json, sys
n, runs = int(sys.argv[1]), int(sys.argv[2])
ping, ping_m, ping_f = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
run, run_m, run_f = int(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8])
master_rss, minions_rss = int(sys.argv[9]), int(sys.argv[10])
s = json.loads(sys.argv[11])
st = s["all_results_ms"]
rows = [
    ("salt '*' test.ping (wall, median)", f"{ping} ms", f"master CPU {ping_m} s, minions CPU {ping_f} s per run"),
    ("salt '*' cmd.run /bin/true (wall, median)", f"{run} ms", f"master CPU {run_m} s, minions CPU {run_f} s per run"),
    ("stella fanout all_results_ms (median)", f"{st} ms", f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, POST {s['create_ms']} ms, plane CPU {s['plane_cpu_s_per_round']} s per fan-out"),
    ("ratio test.ping / stella", f"{ping / max(st, 1):.1f}x", ""),
    ("ratio cmd.run / stella", f"{run / max(st, 1):.1f}x", ""),
    ("salt-master RSS", f"{master_rss // 1024} MiB", "all master processes"),
    ("salt minions RSS", f"{minions_rss // 1024} MiB", f"{minions_rss // 1024 // max(n, 1)} MiB per minion"),
    ("stella plane RSS", f"{s['plane_rss_kib'] // 1024} MiB", ""),
    ("stella fleet RSS", f"{s['fleet_rss_kib'] // 1024} MiB", f"{s['fleet_rss_kib'] // max(n, 1)} KiB per agent (one process)"),
]
print(f"Salt 3006.30 vs Stella, N = {n} on loopback, median of {runs}")
w = max(len(r[0]) for r in rows)
v = max(len(r[1]) for r in rows)
for k, val, note in rows:
    print(f"{k:<{w}}  {val:>{v}}  {note}")
print(json.dumps({"n": n, "runs": runs, "salt_test_ping_ms": ping, "salt_cmd_run_ms": run,
                  "stella_all_results_ms": st, "ratio_test_ping": round(ping / max(st, 1), 1),
                  "ratio_cmd_run": round(run / max(st, 1), 1),
                  "salt_master_rss_kib": master_rss, "salt_minions_rss_kib": minions_rss,
                  "stella": s}))
PY
