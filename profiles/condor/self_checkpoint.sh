#!/usr/bin/env bash
# HTCondor job wrapper of the training rules (profiles/condor: job_wrapper): makes them self-checkpointing in
# HTCondor's terms. The executor plugin runs `self_checkpoint.sh <snakemake arguments>` instead of
# `python -m snakemake <arguments>`.
# - HTCondor's SIGTERM (eviction, condor_vacate, condor_rm) goes to this script only: it is passed to every
#   process of the job (as Slurm signals every process of a step), so the trainer saves a checkpoint at the end
#   of its current optimizer step and exits 75.
# - Snakemake's job exits 1 whatever its script's exit code; the trainer creates $MAMBA_ALIGN_PREEMPTED_MARKER
#   when it stops with a checkpoint, and this script then exits 75, the submit description's
#   checkpoint_exit_code: HTCondor restarts the job (in place, or where it next matches after an eviction) and it
#   resumes from that checkpoint, not from its last periodic save.
# The arguments are the job's whole command when they start with a python executable and `-m` (what plugin 0.3
# passes), else snakemake's arguments, run with $MAMBA_ALIGN_PYTHON (default python3).
set -u
py=${MAMBA_ALIGN_PYTHON:-python3}
marker=$(mktemp "${_CONDOR_SCRATCH_DIR:-${TMPDIR:-/tmp}}/mamba-align-preempted.XXXXXX") || exit 1
rm -f "$marker"
export MAMBA_ALIGN_PREEMPTED_MARKER=$marker
if [ "${2:-}" != "-m" ] || [ ! -x "${1:-}" ]; then  # plugin 0.3 passes the whole command, its python first
  set -- "$py" -m snakemake "$@"
fi
setsid "$@" &
child=$!
trap 'kill -TERM -- "-$child" 2>/dev/null' TERM INT
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
  wait "$child"
  rc=$?
done
if [ -e "$marker" ]; then
  rm -f "$marker"
  echo "self_checkpoint.sh: training stopped with a checkpoint; exit 75 (checkpoint_exit_code)" >&2
  exit 75
fi
exit "$rc"
