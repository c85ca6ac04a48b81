#!/usr/bin/env bash
# The Slurm deployment, tested for real on this machine: a one-node Slurm cluster (munged,
# slurmctld, slurmd from Debian's packages), a live coordinator with tokens, and
# deploy/slurm/workers.sbatch submitted with CPU workers.
#   1. a sweep completes through the workers job;
#   2. a second sweep's workers job is cancelled while it trains (scancel): its seeds go back to
#      the queue, a new workers job finishes them, and no seed is lost or counted twice.
# Bounded in time (SEEDSWEEP_SLURM_TEST_TIMEOUT seconds, default 900); stops every daemon it
# started and deletes its files on exit, success or not.
#
#   deploy/slurm/test.sh [--install]     (root; --install apt-gets slurm-wlm and munge if missing)
#
# Needs the release binaries (cargo build --release --workspace --bins, with scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
limit=${SEEDSWEEP_SLURM_TEST_TIMEOUT:-900}
deadline=$(( $(date +%s) + limit ))

if [ "${1:-}" = --install ] && ! command -v slurmctld >/dev/null; then
  echo "installing slurm-wlm and munge ..." >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
fi
for c in slurmctld slurmd munged sbatch scancel squeue; do
  command -v $c >/dev/null || { echo "error: $c not found: run with --install (as root) or install slurm-wlm and munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (slurmd starts jobs as their users)" >&2; exit 1; }
bin=$root/target/release
[ -x "$bin/coordinator" ] && [ -x "$bin/worker" ] || { echo "error: build first: cargo build --release --workspace --bins" >&2; exit 1; }

work=$(mktemp -d /tmp/seedsweep-slurm.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  set +e
  if [ -n "${SLURM_CONF:-}" ]; then
    # Jobs end before the daemons do, or their step daemons would outlive the cluster.
    scancel --quiet --user=root 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/log/*; do echo "---- $f" >&2; tail -n 40 "$f" >&2; done
  exit 1
}
left() { echo $(( deadline - $(date +%s) )); }
wait_for() { # DESCRIPTION COMMAND...
  local what=$1; shift
  until "$@"; do
    [ "$(left)" -gt 0 ] || fail "timed out waiting for $what"
    sleep 1
  done
}
mkdir -p "$work"/{log,state,spool,shared,data,run}

# munge: a fresh key and socket of our own, so a system munged is left alone.
dd if=/dev/urandom of="$work/munge.key" bs=1024 count=1 status=none
chown munge:munge "$work/munge.key" "$work/run"; chmod 400 "$work/munge.key"
mkdir -p "$work/munge-log"; chown munge:munge "$work/munge-log"
runuser -u munge -- munged --key-file "$work/munge.key" --socket "$work/run/munge.sock" \
  --pid-file "$work/run/munged.pid" --log-file "$work/munge-log/munged.log" --seed-file "$work/run/seed" \
  --foreground --force >"$work/log/munged.out" 2>&1 &
pids+=($!); disown
wait_for "munged" test -S "$work/run/munge.sock"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
node=$(hostname -s)
cpus=$(nproc)
cat >"$work/slurm.conf" <<EOF
ClusterName=seedsweep-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$(port)
SlurmdPort=$(port)
AuthType=auth/munge
AuthInfo=socket=$work/run/munge.sock
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$work/slurm.conf
slurmctld -D -f "$SLURM_CONF" >"$work/log/slurmctld.out" 2>&1 &
pids+=($!); disown
slurmd -D -f "$SLURM_CONF" -N "$node" >"$work/log/slurmd.out" 2>&1 &
pids+=($!); disown
idle() { grep -qE '^(idle|mixed)' <<<"$(sinfo -h -N -o '%T' 2>/dev/null)"; }
wait_for "the Slurm node to be idle" idle
echo "slurm: one node ($node, $cpus CPUs) up" >&2

# The coordinator, with tokens, as workers.sbatch expects to find it.
shared=$work/shared
openssl rand -hex 32 >"$shared/worker.token"
openssl rand -hex 32 >"$shared/admin.token"
chmod 600 "$shared"/*.token
"$bin/coordinator" serve --listen 127.0.0.1:0 --addr-file "$shared/coordinator.addr" \
  --database-url "sqlite://$work/seedsweep.db" --lease-ttl 20 \
  --worker-token-file "$shared/worker.token" --admin-token-file "$shared/admin.token" \
  2>"$work/log/coordinator.log" &
pids+=($!); disown
wait_for "the coordinator" test -s "$shared/coordinator.addr"
export SEEDSWEEP_COORDINATOR="http://$(cat "$shared/coordinator.addr")"
export SEEDSWEEP_ADMIN_TOKEN_FILE=$shared/admin.token
"$bin/worker" make-dataset synthetic --out "$work/data/synthetic" --train 400 --test 200 2>/dev/null

sweep() { "$bin/coordinator" sweep "$@"; }
submit() { # NAME SEEDS EPOCHS -> sweep id
  printf 'name = "%s"\ntask = "resnet9"\ndataset = "synthetic"\nseeds = "%s"\n[train]\nepochs = %s\nbatch_size = 50\nwidth = 0.125\n' \
    "$1" "$2" "$3" >"$work/$1.toml"
  sweep submit "$work/$1.toml"
}
count() { sweep status "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['counts']['$2'])"; }
workers_job() { # JOB NAME -> job id; two CPU workers
  SEEDSWEEP_SHARED=$shared SEEDSWEEP_BIN=$bin SEEDSWEEP_WORKER_DEVICE=cpu SEEDSWEEP_DATA_DIR=$work/data \
    SEEDSWEEP_EXIT_WHEN_IDLE=${EXIT_WHEN_IDLE:-} SEEDSWEEP_COORDINATOR= \
    sbatch --parsable --ntasks=2 --cpus-per-task=1 --chdir="$work" --output="$work/log/$1-%j.log" \
      --job-name="$1" "$root/deploy/slurm/workers.sbatch"
}
job_gone() { [ -z "$(squeue -h -j "$1" 2>/dev/null)" ]; }

# 1. A sweep completes through a workers job (its workers exit when no work is left).
a=$(submit first 0..6 1)
job=$(EXIT_WHEN_IDLE=1 workers_job first)
echo "sweep $a: workers job $job submitted" >&2
done_a() { [ "$(count "$a" done)" = 6 ]; }
wait_for "sweep 1 to finish" done_a
wait_for "workers job $job to end" job_gone "$job"
echo "ok: sweep 1 finished through Slurm job $job (6/6 seeds)" >&2

# 2. Cancel a workers job while it trains; its seeds are handed back and a new job finishes them.
b=$(submit second 0..6 30)
job=$(workers_job second)
leased() { [ "$(count "$b" leased)" -ge 1 ]; }
wait_for "sweep 2 to be training" leased
scancel "$job"
wait_for "workers job $job to end after scancel" job_gone "$job"
grep -q "handed the seed back" "$work"/log/second-"$job".log \
  || fail "the cancelled job's workers did not hand their seeds back"
released() { [ "$(count "$b" leased)" = 0 ]; }
wait_for "sweep 2's leases to return to the queue" released
echo "ok: scancel of job $job: seeds handed back ($(count "$b" done) done, $(count "$b" pending) pending)" >&2
job=$(EXIT_WHEN_IDLE=1 workers_job second-again)
done_b() { [ "$(count "$b" done)" = 6 ]; }
wait_for "sweep 2 to finish" done_b
results=$(sweep results "$b" --json | python3 -c "import json,sys; r=json.load(sys.stdin); print(len(r), len({x['seed'] for x in r}))")
[ "$results" = "6 6" ] || fail "sweep 2 has results (rows, distinct seeds) = $results, expected 6 6"
[ "$(count "$b" failed)" = 0 ] || fail "sweep 2 has failed seeds"
wait_for "workers job $job to end" job_gone "$job"
echo "ok: sweep 2 finished by job $job: 6 results, 6 distinct seeds, none failed" >&2
echo "slurm test passed in $(( limit - $(left) )) s" >&2
