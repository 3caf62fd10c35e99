from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.ops.store.runs import train_keyed
from mamba_align.train.data import check_source_revision
from mamba_align.train.job import TrainJob
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
check_source_revision(snakemake.input.train)  # a Hub dataset still at the commit its data was prepared from
# the recipe the workflow parsed (params.job_recipe), checked against the learned settings Snakemake records
train_keyed(TrainJob.from_snakemake(snakemake, "sft"))

record_snakemake_job(snakemake)
