rule report:
    """Scores of every evaluated stage beside published rows, MT-Bench radar and training curves."""
    input:
        evals=[
            PATHS.eval_summary(s, b) for s in EVAL["stages"] for b in layout.BENCHMARKS
        ],
        metrics=[PATHS.metrics(s) for s in EVAL["stages"] if s != "base"],
        leaderboard=[
            PATHS.eval_summary(s, layout.LEADERBOARD)
            for s in EVAL["leaderboard"]["stages"]
        ],
    output:
        table=PATHS.report("table"),
        # the HTML table is what Snakemake's report shows inline (a .md is only a download there)
        html=report(
            PATHS.report("html"),
            caption="../report/scores.rst",
            category="Scores",
        ),
        csv=PATHS.report("csv"),
        json=PATHS.report("json"),
        radar=report(
            PATHS.report("radar"),
            caption="../report/radar.rst",
            category="Scores",
        ),
        curves=report(
            PATHS.report("curves"),
            caption="../report/curves.rst",
            category="Training",
        ),
        leaderboard=PATHS.report("leaderboard"),
        leaderboard_changes=report(
            PATHS.report("leaderboard_changes"),
            caption="../report/leaderboard.rst",
            category="Scores",
        ),
        provenance=PATHS.provenance("report"),
    log:
        PATHS.log("report"),
    benchmark:
        PATHS.benchmark("report")
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
