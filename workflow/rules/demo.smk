rule build_demo_inputs:
    """The demo's own inputs: a tiny mamba_ssm-format model, a tokenizer and synthetic chat data; with
    `demo_inputs` (the rehearsal), a model of that shape, sized data and benchmark-sized question sets.
    """
    input:
        vocab=[
            "config/demo/mt_bench/question.jsonl",
            "config/demo/alpaca_eval/alpaca_eval.json",
            *sorted(glob.glob("config/demo/leaderboard/*.jsonl")),
        ],
        judge_prompts="config/demo/mt_bench/judge_prompts.jsonl",
    output:
        directory(PATHS.demo()),
        provenance=PATHS.provenance("build_demo_inputs"),
    log:
        PATHS.log("build_demo_inputs"),
    benchmark:
        PATHS.benchmark("build_demo_inputs")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=32000 if config["demo_inputs"] else 2000,  # the 2.8B shape: an 11 GB checkpoint
        runtime=10,
    params:
        **settings_params("shape", config["demo_inputs"]),
    script:
        "../scripts/build_demo_inputs.py"
