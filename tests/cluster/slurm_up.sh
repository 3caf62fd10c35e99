#!/usr/bin/env bash
# Start a throwaway single-node Slurm for the cluster test tier, as root and without systemd:
# munged + slurmctld + slurmd (+ MariaDB + slurmdbd with WITH_DBD=1, so that sacct works).
# The node looks like a (tiny) A100-80GB node: one GPU of GRES type `a100` (File=/dev/null,
# no real device) and the node feature `a100_80gb`, so profiles/slurm's selectors are exercised.
#
#   BASE=/tmp/mamba-align-slurm [WITH_DBD=0|1] bash tests/cluster/slurm_up.sh
#   BASE=/tmp/mamba-align-slurm bash tests/cluster/slurm_down.sh
#
# Every daemon this script starts is recorded in $BASE/started.pids ("name pidfile"), and
# slurm_down.sh stops exactly those. A munged that was already running is left alone.
# Job records: $BASE/slurm/log/jobcomp.txt (jobcomp/filetxt, always), sacct (WITH_DBD=1).
set -euo pipefail
BASE=${BASE:-/tmp/mamba-align-slurm}
WITH_DBD=${WITH_DBD:-0}
GPU_TYPE=${GPU_TYPE:-a100}
NODE_FEATURE=${NODE_FEATURE:-a100_80gb}
# GPUs on the fake node (GPU_COUNT=4: elastic GPU counts, tests/cluster/test_slurm_gpu_choice.py)
GPU_COUNT=${GPU_COUNT:-1}
S=$BASE/slurm; H=$(hostname -s)
STARTED=$BASE/started.pids

[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: must run as root" >&2; exit 1; }
# Never take over a Slurm that is not ours: the ports and /etc/slurm are machine-wide.
if (exec 3<>/dev/tcp/127.0.0.1/6817) 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/6818) 2>/dev/null; then
  echo "slurm_up.sh: something already listens on 6817/6818 (another Slurm?); refusing" >&2; exit 1
fi

export DEBIAN_FRONTEND=noninteractive
pkgs="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
# shellcheck disable=SC2086
dpkg -s $pkgs >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq $pkgs >/dev/null; }

mkdir -p "$S"/{state,spool,log,run}
: > "$STARTED"

# ---- munge ----
[ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  echo "munged /run/munge/munged.pid" >> "$STARTED"
fi
for _ in $(seq 40); do munge -n >/dev/null 2>&1 && break; sleep 0.25; done

# ---- accounting ----
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

CPUS=$(nproc)
# leave 2 GB to the OS; at least 2 GB for jobs
MEM_MB=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 2048 ))
[ "$MEM_MB" -ge 2048 ] || MEM_MB=2048

cat > "$S/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# seconds between SIGTERM and SIGKILL when a job is cancelled or hits its time limit
KillWait=30
# finished jobs stay visible to squeue/scontrol for 1 h (the plugin's squeue status mode needs >= 3x its poll
# interval; the test reads comments and GPU requests back from squeue)
MinJobAge=3600
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.txt
GresTypes=gpu
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} Gres=gpu:${GPU_TYPE}:${GPU_COUNT} Features=${NODE_FEATURE} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
CONF
# a GPU without File= is dropped by slurmd ("Removing file-less GPU") and the node drains; one file per GPU
if [ "$GPU_COUNT" = 1 ]; then
  echo "NodeName=${H} Name=gpu Type=${GPU_TYPE} File=/dev/null" > "$S/gres.conf"
else
  mkdir -p "$S/dev"
  for i in $(seq 0 $((GPU_COUNT - 1))); do touch "$S/dev/fakegpu$i"; done
  echo "NodeName=${H} Name=gpu Type=${GPU_TYPE} File=$S/dev/fakegpu[0-$((GPU_COUNT - 1))]" > "$S/gres.conf"
fi

# The config must be at the compiled-in default path: snakemake-executor-plugin-slurm-jobstep
# strips every SLURM_* variable (SLURM_CONF included) before its inner srun.
mkdir -p /etc/slurm
ln -sfn "$S/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$S/gres.conf" /etc/slurm/gres.conf

if [ "$WITH_DBD" = 1 ]; then
  M=$BASE/mysql; mkdir -p "$M"
  [ -d "$M/data/mysql" ] || mariadb-install-db --user=root --datadir="$M/data" >/dev/null 2>&1
  mariadbd --user=root --datadir="$M/data" --socket="$M/mysqld.sock" --pid-file="$M/mysqld.pid" \
    --bind-address=127.0.0.1 --port=3306 --log-error="$M/error.log" --skip-log-bin >/dev/null 2>&1 &
  echo "mariadbd $M/mysqld.pid" >> "$STARTED"
  for _ in $(seq 80); do mariadb-admin --socket="$M/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.25; done
  mariadb --socket="$M/mysqld.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat > "$S/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$S/log/slurmdbd.log
PidFile=$S/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$S/slurmdbd.conf"
  ln -sfn "$S/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  slurmdbd
  echo "slurmdbd $S/run/slurmdbd.pid" >> "$STARTED"
  for _ in $(seq 80); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.25; done
fi

slurmctld -i
echo "slurmctld $S/run/slurmctld.pid" >> "$STARTED"
slurmd
echo "slurmd $S/run/slurmd.pid" >> "$STARTED"
for _ in $(seq 120); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.25; done
sinfo -h -o %T | grep -qx idle || { echo "slurm did not come up" >&2; tail -20 "$S"/log/*.log >&2; exit 1; }
if [ "$WITH_DBD" = 1 ]; then
  for _ in $(seq 80); do sacctmgr -n list cluster format=cluster 2>/dev/null | grep -q ci && break; sleep 0.25; done
fi
echo "slurm up: $(sinfo -h -o '%P %T %G %f' | tr '\n' ' ')"
