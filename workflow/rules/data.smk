import glob

from mamba_align.train import data as prepared_data


def local_source(dataset):
    """A local dataset that no rule builds (outside the results folder) as a param holding a digest of its files'
    names, sizes and times: an edit, even one that keeps the folder's own time, reruns the data step. A Hub
    dataset adds nothing here (its revision is a param; its commit is checked before training).
    """
    source = dataset["source"]
    if Path(source).resolve().is_relative_to(Path(R).resolve()):
        return {}  # built by a rule (the demo's inputs): that rule's output decides
    digest = prepared_data.local_source_digest(source)
    return {"source_files": digest} if digest else {}


# Snakemake touches a job's outputs after it: a data step's byte-identical rewrite gets its earlier time back
# here, at the next parse, before the DAG compares times (mamba_align.train.data.record_outputs).
if workflow.is_main_process:
    for d in [f"{R}/data/sft", f"{R}/data/dpo", *glob.glob(f"{R}/shared/data/*/*")]:
        prepared_data.settle_kept_mtimes(d)


rule prepare_sft_data:
    """Chat data (UltraChat schema) rendered with the model's chat template, written as parquet."""
    input:
        demo_inputs(),
        model=model_of("base"),
    output:
        train=f"{R}/data/sft/train.parquet",
        test=f"{R}/data/sft/test.parquet",
        stats=f"{R}/data/sft/stats.json",
    log:
        f"{R}/logs/prepare_sft_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_sft_data.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=16000,
        runtime=60,
    params:
        **local_source(SFT["dataset"]),
        dataset=SFT["dataset"],
        max_seq_length=SFT["max_seq_length"],
        packing=SFT["packing"],
    script:
        "../scripts/prepare_sft_data.py"


rule prepare_preference_data:
    """Preference pairs (UltraFeedback schema) as templated prompt / chosen / rejected, as parquet."""
    input:
        demo_inputs(),
        model=model_of("base"),
    output:
        train=f"{R}/data/dpo/train.parquet",
        test=f"{R}/data/dpo/test.parquet",
        stats=f"{R}/data/dpo/stats.json",
    log:
        f"{R}/logs/prepare_preference_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_preference_data.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=16000,
        runtime=60,
    params:
        **local_source(DPO["dataset"]),
        dataset=DPO["dataset"],
        max_length=DPO["max_length"],
        max_prompt_length=DPO["max_prompt_length"],
    script:
        "../scripts/prepare_preference_data.py"
