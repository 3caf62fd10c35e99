#!/usr/bin/env bash
# Stop the daemons that slurm_up.sh started (listed in $BASE/started.pids), newest first, by the
# PID in each one's pid file; wait for each to exit (SIGKILL after 10 s). Safe to run twice.
#   BASE=/tmp/mamba-align-slurm bash tests/cluster/slurm_down.sh
BASE=${BASE:-/tmp/mamba-align-slurm}
STARTED=$BASE/started.pids
[ -s "$STARTED" ] || exit 0

stop() {  # $1 = name, $2 = pid file
  local pid
  [ -s "$2" ] || { echo "slurm_down.sh: no pid file for $1 ($2)" >&2; return 0; }
  pid=$(tr -dc 0-9 < "$2")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  echo "slurm_down.sh: $1 ($pid) ignored SIGTERM; SIGKILL" >&2
  kill -9 "$pid" 2>/dev/null
}

# Jobs first: their slurmstepd processes outlive slurmd. Every job of this cluster is ours.
if grep -q '^slurmctld ' "$STARTED" && squeue -h -o %i >/dev/null 2>&1; then
  scancel --full --cluster=ci --user=root 2>/dev/null
  for _ in $(seq 60); do [ -z "$(squeue -h -t all -o '%i %T' | grep -vE 'COMPLETED|CANCELLED|FAILED|TIMEOUT|NODE_FAIL|PREEMPTED|OUT_OF_MEMORY')" ] && break; sleep 0.5; done
fi
tac "$STARTED" | while read -r name pidfile; do stop "$name" "$pidfile"; done
# only our own links: they point into $BASE
for f in slurm.conf gres.conf slurmdbd.conf; do
  [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$BASE/slurm/$f" ] && rm -f "/etc/slurm/$f"
done
rm -f "$STARTED"
