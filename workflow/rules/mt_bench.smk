MTB = EVAL["mt_bench"]


rule fetch_mt_bench:
    """MT-Bench questions, judge prompts and GPT-4 reference answers from FastChat at a pinned commit."""
    input:
        built_by_demo(MTB["local_dir"]),
    output:
        **PATHS.mt_bench_data(),
        provenance=PATHS.provenance("fetch_mt_bench"),
    log:
        PATHS.log("fetch_mt_bench"),
    benchmark:
        PATHS.benchmark("fetch_mt_bench")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        commit=MTB["fastchat_commit"],
        local_dir=MTB["local_dir"],
    script:
        "../scripts/fetch_mt_bench.py"


rule generate_mt_bench:
    """Answers to both turns of every MT-Bench question (FastChat's answer format), resumable."""
    input:
        model=model_for,
        questions=rules.fetch_mt_bench.output.questions,
    output:
        PATHS.stage_eval("{stage}", layout.MT_BENCH_ANSWERS),
        provenance=PATHS.provenance("generate_mt_bench-{stage}"),
    log:
        PATHS.log("generate_mt_bench/{stage}"),
    benchmark:
        PATHS.benchmark("generate_mt_bench/{stage}")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=planned_runtime("generate_mt_bench", 60),
    params:
        # the scored model's identity: a retrain (even a failed one) reruns this evaluation
        **settings_params("model", lambda w: learned_by(w.stage), like=any_learned()),
        model_id=lambda w: f"{config['run_name']}-{w.stage}",
        max_new_tokens=MTB["max_new_tokens"],
        batch_size=EVAL["generation_batch_size"],
    script:
        "../scripts/generate_mt_bench.py"


rule judge_mt_bench:
    """Single-answer grading as FastChat does it; judgments cached in a JSONL beside the output so a
    rerun pays only for what is missing."""
    input:
        answers=answers_for(layout.MT_BENCH_ANSWERS),
        questions=rules.fetch_mt_bench.output.questions,
        judge_prompts=rules.fetch_mt_bench.output.judge_prompts,
        reference=rules.fetch_mt_bench.output.reference,
    output:
        PATHS.summary("mtbench"),
        judgments=PATHS.scored(layout.MT_BENCH_JUDGMENTS),
        provenance=PATHS.provenance("{stagedir}judge_mt_bench"),
    log:
        PATHS.log("judge_mt_bench/{stagedir}judge"),
    benchmark:
        PATHS.benchmark("judge_mt_bench/{stagedir}judge")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=JUDGE.gpus,  # a local judge on CUDA holds the GPU
        mem_mb=4000,
        runtime=120,
    params:
        **settings_params("judge", JUDGE.as_dict()),
        # the scored model's identity, recorded in the score (model_key, model_run_key) for status and the report
        **settings_params("model", scored_learned_by, like=any_learned()),
        cache=lambda w: PATHS.stage_eval(
            layout.stage_of(w.stagedir), layout.MT_BENCH_JUDGE_CACHE
        ),
        model_dir=scored_model_dir,
    script:
        "../scripts/judge_mt_bench.py"
