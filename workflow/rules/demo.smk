rule build_demo_inputs:
    """The demo's own inputs: a tiny mamba_ssm-format model, a tokenizer and synthetic chat data."""
    input:
        vocab=[
            "config/demo/mt_bench/question.jsonl",
            "config/demo/alpaca_eval/alpaca_eval.json",
        ],
    output:
        directory(f"{R}/demo"),
    log:
        f"{R}/logs/build_demo_inputs.log",
    benchmark:
        f"{R}/benchmarks/build_demo_inputs.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/build_demo_inputs.py"
