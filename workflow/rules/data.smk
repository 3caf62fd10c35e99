rule prepare_sft_data:
    """Chat data (UltraChat schema) rendered with the model's chat template, written as parquet."""
    input:
        demo_inputs(),
        model=model_of("base"),
    output:
        **PATHS.train_data("sft"),
        provenance=PATHS.provenance("prepare_sft_data"),
    log:
        PATHS.log("prepare_sft_data"),
    benchmark:
        PATHS.benchmark("prepare_sft_data")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=16000,
        runtime=60,
    params:
        **local_source(SFT["dataset"]),
        **settings_params("dataset", SFT["dataset"]),
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
        **PATHS.train_data("dpo"),
        provenance=PATHS.provenance("prepare_preference_data"),
    log:
        PATHS.log("prepare_preference_data"),
    benchmark:
        PATHS.benchmark("prepare_preference_data")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=16000,
        runtime=60,
    params:
        **local_source(DPO["dataset"]),
        **settings_params("dataset", DPO["dataset"]),
        max_length=DPO["max_length"],
        max_prompt_length=DPO["max_prompt_length"],
    script:
        "../scripts/prepare_preference_data.py"
