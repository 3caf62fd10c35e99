rule prepare_base_model:
    """Download (or read) the base model, convert it to a transformers checkpoint with tokenizer and
    chat template, and check that the logits did not change."""
    input:
        demo_inputs(),
    output:
        model=directory(model_of("base")),
        report=PATHS.base_verify(),
        provenance=PATHS.provenance("prepare_base_model"),
    log:
        PATHS.log("prepare_base_model"),
    benchmark:
        PATHS.benchmark("prepare_base_model")
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
