LB = EVAL["leaderboard"]


rule fetch_leaderboard_data:
    """The leaderboard tasks' datasets into the Hugging Face cache, and NLTK's punkt_tab for IFEval, where the
    internet is reachable; every configured metric checked against lm-eval's task before any GPU time.
    """
    input:
        leaderboard_task_files(),
    output:
        tasks=PATHS.leaderboard_tasks(),
        provenance=PATHS.provenance("fetch_leaderboard_data"),
    log:
        PATHS.log("fetch_leaderboard_data"),
    benchmark:
        PATHS.benchmark("fetch_leaderboard_data")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        **settings_params("leaderboard", LB),
        nltk_dir=PATHS.nltk_dir(),
    script:
        "../scripts/fetch_leaderboard_data.py"


rule eval_leaderboard:
    """The model of one stage on the leaderboard tasks through lm-eval (one GPU); a preempted job resumes from
    its finished tasks and answered requests."""
    input:
        model=lambda w: model_of(layout.stage_of(w.stagedir)),
        tasks=rules.fetch_leaderboard_data.output.tasks,
    output:
        PATHS.summary(layout.LEADERBOARD),
        provenance=PATHS.provenance("{stagedir}eval_leaderboard"),
    log:
        PATHS.log("eval_leaderboard/{stagedir}eval"),
    benchmark:
        PATHS.benchmark("eval_leaderboard/{stagedir}eval")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=leaderboard_runtime,
    params:
        **settings_params("leaderboard", LB),
        **settings_params("model", scored_learned_by, like=any_learned()),
        nltk_dir=rules.fetch_leaderboard_data.params.nltk_dir,
        # the scored model's identity: a retrain reruns this evaluation; recorded in the score for status
        model_dir=scored_model_dir,
    script:
        "../scripts/eval_leaderboard.py"
