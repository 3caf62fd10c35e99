LB = EVAL["leaderboard"]


rule fetch_leaderboard_data:
    """The leaderboard tasks' datasets into the Hugging Face cache, and NLTK's punkt_tab for IFEval, where the
    internet is reachable; every configured metric checked against lm-eval's task before any GPU time.
    """
    input:
        leaderboard_task_files(),
    output:
        tasks=f"{R}/data/leaderboard/tasks.json",
        provenance=f"{R}/provenance/fetch_leaderboard_data.json",
    log:
        f"{R}/logs/fetch_leaderboard_data.log",
    benchmark:
        f"{R}/benchmarks/fetch_leaderboard_data.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        **settings_params("leaderboard", LB),
        nltk_dir=f"{R}/data/leaderboard/nltk_data",
    script:
        "../scripts/fetch_leaderboard_data.py"


rule eval_leaderboard:
    """The model of one stage on the leaderboard tasks through lm-eval (one GPU); a preempted job resumes from
    its finished tasks and answered requests."""
    input:
        model=lambda w: model_of(layout.stage_of(w.stagedir)),
        tasks=rules.fetch_leaderboard_data.output.tasks,
    output:
        f"{R}/eval/{{stagedir}}leaderboard.json",
        provenance=f"{R}/provenance/{{stagedir}}eval_leaderboard.json",
    log:
        f"{R}/logs/eval_leaderboard/{{stagedir}}eval.log",
    benchmark:
        f"{R}/benchmarks/eval_leaderboard/{{stagedir}}eval.tsv"
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
