#!/usr/bin/env bash
# A private one-node SLURM on this machine, for trying launch/slurm/train.sbatch (and for its slow test):
# its own munged (own key and socket), slurmctld and slurmd, all state under one folder, on ports of their
# own, so a SLURM or munge already on the machine is never touched. Needs root and Debian's slurm-wlm and
# munge (setup.sh installs them among its optional packages).
#   sudo bash launch/slurm/local_cluster.sh start [DIR]   (prints the SLURM_CONF to export)
#   sudo bash launch/slurm/local_cluster.sh stop [DIR]    (cancels its jobs, stops the daemons start started)
# DIR defaults to /tmp/iddpm_slurm; $SLURM_LOCAL_PORT (16817) and the port after it are slurmctld's and
# slurmd's. A requeued job may start again 5 s later (cred_expire=5; SLURM's default is 120 s), and the
# scheduler looks at pending jobs every 2 s, so a test of requeues takes seconds, not minutes. The node is this machine with all its CPUs; KillWait is 30 s (SIGTERM
# at a time limit or cancel, SIGKILL 30 s later), as SLURM's default.
set -euo pipefail
ACTION=${1:-}
DIR=$(realpath -m "${2:-/tmp/iddpm_slurm}")
fail() { echo "local_cluster.sh: $*" >&2; exit 2; }
[ "$ACTION" = start ] || [ "$ACTION" = stop ] || fail "usage: local_cluster.sh start|stop [DIR]"

stop() {
  # Only the daemons whose pid files we wrote, and only while they still are those programs.
  for name in slurmd slurmctld munged; do
    local pidfile="$DIR/$name.pid"
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
      kill "$pid"
      for _ in $(seq 50); do [ -d /proc/"$pid" ] || break; sleep 0.1; done
      [ -d /proc/"$pid" ] && kill -9 "$pid"
    fi
    rm -f "$pidfile"
  done
}

if [ "$ACTION" = stop ]; then
  # First the jobs: cancelled through this cluster's own controller, and waited for (their steps would
  # otherwise outlive slurmd and run on).
  if [ -f "$DIR/slurmctld.pid" ]; then
    export SLURM_CONF=$DIR/slurm.conf
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs
      for _ in $(seq 120); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop
  rm -rf "$DIR"
  echo "local SLURM in $DIR stopped"
  exit 0
fi

[ "$(id -u)" = 0 ] || fail "needs root (slurmd runs jobs as their users)"
for tool in slurmctld:slurm-wlm slurmd:slurmd munged:munge sinfo:slurm-client; do
  command -v "${tool%%:*}" >/dev/null || fail "needs ${tool%%:*}: apt-get install slurm-wlm munge"
done
[ -f "$DIR/slurmctld.pid" ] && fail "$DIR already holds a running cluster: stop it first"
rm -rf "$DIR"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool"
chmod 700 "$DIR/munge"
NODE=$(hostname -s)
PORT=${SLURM_LOCAL_PORT:-16817}
# nproc reports OMP_NUM_THREADS when it is set (1 in many training shells), which would make a 2-task job
# unschedulable (PENDING, PartitionConfig): the node has the CPUs this process may run on.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))

# munge: a fresh key and a socket of our own.
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munge.seed"

cat > "$DIR/slurm.conf" <<EOF
ClusterName=iddpm
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
KillWait=30
JobRequeue=1
MinJobAge=600
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$DIR/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
[ "$state" = idle ] || { stop; fail "the node did not come up (state '${state:-none}'): see $DIR/*.log"; }
echo "local SLURM up: node $NODE, $CPUS CPUs; export SLURM_CONF=$SLURM_CONF"
