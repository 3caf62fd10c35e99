rule plan:
    """GPU-hours, wall time and memory per job, judge requests and cost, before anything runs."""
    input:
        demo_inputs(),
    output:
        json=PATHS.plan("json"),
        table=PATHS.plan("txt"),
        provenance=PATHS.provenance("plan"),
    log:
        PATHS.log("plan"),
    benchmark:
        PATHS.benchmark("plan")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    params:
        **settings_params("sft", SFT),
        **settings_params("dpo", DPO),
        **settings_params("gpus", training_gpus()),
        # a grid's experiments (None: the one experiment of the config)
        **settings_params("experiments", GRID.to_dict() if GRID else None),
        gpu_type=gpu_type_of("train_sft"),
    script:
        "../scripts/plan.py"
