AE = EVAL["alpaca_eval"]


rule fetch_alpaca_eval:
    """AlpacaEval instructions and the reference outputs its annotators need (1.0 and/or 2.0) plus the
    length-control inputs."""
    input:
        built_by_demo(AE["local_dir"]),
    output:
        directory(PATHS.alpaca_eval_data()),
        provenance=PATHS.provenance("fetch_alpaca_eval"),
    log:
        PATHS.log("fetch_alpaca_eval"),
    benchmark:
        PATHS.benchmark("fetch_alpaca_eval")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        **settings_params("sha256", AE["sha256"]),
        revision=AE["revision"],
        local_dir=AE["local_dir"],
        annotators=AE["annotators"],
    script:
        "../scripts/fetch_alpaca_eval.py"


rule generate_alpaca_eval:
    """Model outputs for every AlpacaEval instruction (alpaca_eval's JSON, in the data's order), resumable."""
    input:
        model=model_for,
        data=rules.fetch_alpaca_eval.output[0],
    output:
        PATHS.stage_eval("{stage}", layout.ALPACA_EVAL_OUTPUTS),
        provenance=PATHS.provenance("generate_alpaca_eval-{stage}"),
    log:
        PATHS.log("generate_alpaca_eval/{stage}"),
    benchmark:
        PATHS.benchmark("generate_alpaca_eval/{stage}")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=planned_runtime("generate_alpaca_eval", 120),
    params:
        # the scored model's identity: a retrain (even a failed one) reruns this evaluation
        **settings_params("model", lambda w: learned_by(w.stage), like=any_learned()),
        generator=lambda w: f"{config['run_name']}-{w.stage}",
        temperature=AE["temperature"],
        top_p=AE["top_p"],
        top_k=AE["top_k"],
        max_new_tokens=AE["max_new_tokens"],
        batch_size=EVAL["generation_batch_size"],
    script:
        "../scripts/generate_alpaca_eval.py"


rule judge_alpaca_eval:
    """Win rates (1.0) and length-controlled win rates (2.0) with the alpaca_eval library; its annotation
    cache lives beside the output so a rerun pays only for what is missing."""
    input:
        outputs=answers_for(layout.ALPACA_EVAL_OUTPUTS),
        data=rules.fetch_alpaca_eval.output[0],
    output:
        PATHS.summary("alpacaeval"),
        provenance=PATHS.provenance("{stagedir}judge_alpaca_eval"),
    log:
        PATHS.log("judge_alpaca_eval/{stagedir}judge"),
    benchmark:
        PATHS.benchmark("judge_alpaca_eval/{stagedir}judge")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=ALPACA_EVAL_JUDGE.gpus,  # a local judge on CUDA holds the GPU
        mem_mb=4000,
        runtime=240,
    params:
        # judge.* with eval.alpaca_eval.judge_model in place of judge.model (common.smk: ALPACA_EVAL_JUDGE)
        **settings_params("judge", ALPACA_EVAL_JUDGE.as_dict()),
        # the scored model's identity, recorded in the score (model_key, model_run_key) for status and the report
        **settings_params("model", scored_learned_by, like=any_learned()),
        annotators=AE["annotators"],
        cache=lambda w: PATHS.stage_eval(
            layout.stage_of(w.stagedir), layout.ALPACA_EVAL_CACHE
        ),
        model_dir=scored_model_dir,
    script:
        "../scripts/judge_alpaca_eval.py"
