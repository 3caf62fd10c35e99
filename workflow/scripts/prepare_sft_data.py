from pathlib import Path

from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.train.data import prepare_sft_data
from mamba_align.train.recipes import DatasetSpec
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
prepare_sft_data(DatasetSpec(**p.dataset), snakemake.input.model, Path(snakemake.output.train).parent,
                 p.max_seq_length, p.packing, inputs=list(snakemake.input))

record_snakemake_job(snakemake)
