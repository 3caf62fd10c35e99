"""Record what an executor plugin would submit for every job of a dry run, without a cluster.

    python tests/cluster/capture_submits.py {htcondor|slurm} OUT.jsonl -- <snakemake arguments, with -n>

Snakemake runs the dry run as usual (profiles, --set-resources, the real rules and their input
functions); each job it would run is handed to the real plugin code as well:
- htcondor: the plugin's `run_job` builds the submit description; `htcondor2.Submit` is replaced by a
  recorder that stops before anything reaches a schedd.
- slurm: the plugin's own `get_submit_command` + `set_gres_string` (what its `run_job` joins into
  the sbatch call), with account/partition left empty since those need a cluster.
One JSON line per job: rule, threads, the job's evaluated resources and the submission.
Pass `--cores` large enough (e.g. 1024): a dry run caps each job's threads at the local cores.
"""

from __future__ import annotations

import json
import sys


class _Captured(Exception):
    pass


def _plain(value):
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)


def _resources(job) -> dict:
    return {k: _plain(job.resources[k]) for k in job.resources.keys() if not k.startswith("_")}


def main(argv: list[str]) -> None:
    kind, out_path, sep, *snakemake_args = argv
    assert sep == "--" and kind in {"htcondor", "slurm"}, __doc__
    from snakemake.executors import dryrun

    records = open(out_path, "w")
    dry_run_job = dryrun.Executor.run_job

    if kind == "htcondor":
        import snakemake_executor_plugin_htcondor as plugin

        captured = {}

        def record(submit_dict):
            captured["submit"] = {k: _plain(v) for k, v in submit_dict.items()}
            raise _Captured

        plugin.htcondor.Submit = record

        def submission(executor, job):
            condor = getattr(executor, "_capture_condor", None)
            if condor is None:

                class Workflow:  # the dry run's workflow, with the htcondor plugin's own settings
                    executor_settings = plugin.ExecutorSettings(jobdir=".snakemake/htcondor")

                    def __getattr__(self, name):
                        return getattr(executor.workflow, name)

                condor = executor._capture_condor = plugin.Executor(Workflow(), executor.logger)
            try:
                condor.run_job(job)
            except _Captured:
                return captured.pop("submit")
            raise AssertionError("the htcondor plugin did not build a submit description")

    else:
        from snakemake_executor_plugin_slurm import ExecutorSettings
        from snakemake_executor_plugin_slurm.submit_string import get_submit_command
        from snakemake_executor_plugin_slurm.utils import set_gres_string
        from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

        settings = ExecutorSettings()

        def submission(executor, job):
            validate_slurm_extra(job)
            params = {"run_uuid": "RUN", "slurm_logfile": "LOG", "comment_str": f"rule_{job.name}",
                      "account": "", "partition": "", "workdir": "."}
            return get_submit_command(job, params, settings=settings) + set_gres_string(job)

    def run_job(self, job):
        records.write(json.dumps({"rule": job.name, "threads": job.threads, "resources": _resources(job),
                                  "submit": submission(self, job)}) + "\n")
        records.flush()
        dry_run_job(self, job)

    dryrun.Executor.run_job = run_job
    from snakemake.cli import main as snakemake_main

    snakemake_main(snakemake_args)


if __name__ == "__main__":
    main(sys.argv[1:])
