rule prepare_base_model:
    """Download (or read) the base model, convert it to a transformers checkpoint with tokenizer and
    chat template, and check that the logits did not change."""
    input:
        demo_inputs(),
    output:
        model=directory(model_of("base")),
        report=f"{R}/models/base.verify.json",
        provenance=f"{R}/provenance/prepare_base_model.json",
    log:
        f"{R}/logs/prepare_base_model.log",
    benchmark:
        f"{R}/benchmarks/prepare_base_model.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=64000,
        runtime=120,
    params:
        **settings_params("base", BASE),
    script:
        "../scripts/prepare_base_model.py"
