rule report:
    """Scores of every evaluated stage beside published rows, MT-Bench radar and training curves."""
    input:
        evals=[
            layout.eval_summary(R, s, b)
            for s in EVAL["stages"]
            for b in layout.BENCHMARKS
        ],
        metrics=[f"{R}/metrics/{s}.json" for s in EVAL["stages"] if s != "base"],
        leaderboard=[
            layout.eval_summary(R, s, layout.LEADERBOARD)
            for s in EVAL["leaderboard"]["stages"]
        ],
    output:
        table=f"{R}/report/scores.md",
        # the HTML table is what Snakemake's report shows inline (a .md is only a download there)
        html=report(
            f"{R}/report/scores.html",
            caption="../report/scores.rst",
            category="Scores",
        ),
        csv=f"{R}/report/scores.csv",
        json=f"{R}/report/scores.json",
        radar=report(
            f"{R}/report/mt_bench_radar.png",
            caption="../report/radar.rst",
            category="Scores",
        ),
        curves=report(
            f"{R}/report/training_curves.png",
            caption="../report/curves.rst",
            category="Training",
        ),
        leaderboard=f"{R}/report/leaderboard.json",
        leaderboard_changes=report(
            f"{R}/report/leaderboard_changes.png",
            caption="../report/leaderboard.rst",
            category="Scores",
        ),
        provenance=f"{R}/provenance/report.json",
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    params:
        # what each stage's model learned from: a score computed for another model is shown as stale
        **settings_params(
            "models",
            {
                s: learned_by(s)
                for s in layout.STAGES
                if s in EVAL["stages"] or s in EVAL["leaderboard"]["stages"]
            },
        ),
        run_name=config["run_name"],
        stages=EVAL["stages"],
        leaderboard_stages=EVAL["leaderboard"]["stages"],
        demo=config["demo"],
    script:
        "../scripts/report.py"
