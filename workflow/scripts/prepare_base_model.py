from mamba_align.model.convert import prepare_base_model
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
b = snakemake.params.base
prepare_base_model(b["source"], b["revision"], b["tokenizer"], b["tokenizer_revision"], b["chat_template"],
                   snakemake.output.model, snakemake.output.report, verify=b["verify"], rule=snakemake.rule)

record_snakemake_job(snakemake)
