# Experiments of a grid (config `experiments`): the same rules, with outputs under folders keyed by what each
# job learns from (mamba_align.ops.store.experiments), so that work the experiments share runs once. Inactive (no
# target asks for these paths) when the config names no experiments.

# the model folders ("homes", mamba_align.ops.store.layout.home) of the grid's training rules' wildcards
BASE_HOME = layout.home("base", "{key}")
SFT_HOME = layout.home("sft", "{key}")
DPO_HOME = layout.home("dpo", "{name}")


use rule prepare_base_model as prepare_base_model_grid with:
    input:
        demo_inputs(),
    output:
        model=directory(PATHS.home_model(BASE_HOME)),
        report=PATHS.home_verify(BASE_HOME),
        provenance=PATHS.provenance("prepare_base_model_grid-{key}"),
    log:
        PATHS.log(BASE_HOME, "prepare_base_model"),
    benchmark:
        PATHS.benchmark(BASE_HOME, "prepare_base_model")
    params:
        **settings_params(
            "base", grid_base, like=grid_like(lambda r: r.exp.base_model, BASE)
        ),


use rule prepare_sft_data as prepare_sft_data_grid with:
    input:
        demo_inputs(),
        model=lambda w: GRID.model(GRID.data_owner("sft", w.key), "base"),
    output:
        **PATHS.train_data("sft", "{key}"),
        provenance=PATHS.provenance("prepare_sft_data_grid-{key}"),
    log:
        PATHS.log(layout.data_home("sft", "{key}"), "prepare_sft_data"),
    benchmark:
        PATHS.benchmark(layout.data_home("sft", "{key}"), "prepare_sft_data")
    params:
        **grid_local_source("sft"),
        **settings_params(
            "dataset",
            grid_data("sft", "dataset"),
            like=grid_like(lambda r: r.sft["dataset"], SFT["dataset"]),
        ),
        max_seq_length=grid_data("sft", "max_seq_length"),
        packing=grid_data("sft", "packing"),


use rule prepare_preference_data as prepare_preference_data_grid with:
    input:
        demo_inputs(),
        model=lambda w: GRID.model(GRID.data_owner("dpo", w.key), "base"),
    output:
        **PATHS.train_data("dpo", "{key}"),
        provenance=PATHS.provenance("prepare_preference_data_grid-{key}"),
    log:
        PATHS.log(layout.data_home("dpo", "{key}"), "prepare_preference_data"),
    benchmark:
        PATHS.benchmark(layout.data_home("dpo", "{key}"), "prepare_preference_data")
    params:
        **grid_local_source("dpo"),
        **settings_params(
            "dataset",
            grid_data("dpo", "dataset"),
            like=grid_like(lambda r: r.dpo["dataset"], DPO["dataset"]),
        ),
        max_length=grid_data("dpo", "max_length"),
        max_prompt_length=grid_data("dpo", "max_prompt_length"),


use rule train_sft as train_sft_grid with:
    input:
        unpack(lambda w: grid_data_files("sft", GRID.first_sft[w.key])),
        model=lambda w: GRID.model(GRID.first_sft[w.key], "base"),
    output:
        model=directory(PATHS.home_model(SFT_HOME)),
        metrics=PATHS.home_metrics(SFT_HOME),
        provenance=PATHS.provenance("train_sft_grid-{key}"),
    log:
        PATHS.log(SFT_HOME, "train_sft"),
    benchmark:
        PATHS.benchmark(SFT_HOME, "train_sft")
    resources:
        gpu=training_gpu_request("train_sft_grid"),
        request_gpus=training_gpu_request("train_sft_grid"),
        mem_mb=32000,
        runtime=grid_runtime("train_sft", 60),
    params:
        **settings_params(
            "recipe",
            lambda w: learning_settings(GRID.first_sft[w.key].sft),
            like=grid_like(lambda r: learning_settings(r.sft), learning_settings(SFT)),
        ),
        job_recipe=lambda w: recipes.recipe_of("sft", GRID.first_sft[w.key].sft),
        checkpoints=PATHS.checkpoints(),


use rule train_dpo as train_dpo_grid with:
    input:
        unpack(lambda w: grid_data_files("dpo", GRID.by_name[w.name])),
        model=lambda w: GRID.model(GRID.by_name[w.name], "sft"),
    output:
        model=directory(PATHS.home_model(DPO_HOME)),
        metrics=PATHS.home_metrics(DPO_HOME),
        provenance=PATHS.provenance("train_dpo_grid-{name}"),
    log:
        PATHS.log(DPO_HOME, "train_dpo"),
    benchmark:
        PATHS.benchmark(DPO_HOME, "train_dpo")
    resources:
        gpu=training_gpu_request("train_dpo_grid"),
        request_gpus=training_gpu_request("train_dpo_grid"),
        mem_mb=32000,
        runtime=grid_runtime("train_dpo", 60),
    params:
        **settings_params(
            "recipe",
            lambda w: learning_settings(GRID.by_name[w.name].dpo),
            like=grid_like(lambda r: learning_settings(r.dpo), learning_settings(DPO)),
        ),
        job_recipe=lambda w: recipes.recipe_of("dpo", GRID.by_name[w.name].dpo),
        checkpoints=PATHS.checkpoints(),


use rule generate_mt_bench as generate_mt_bench_grid with:
    input:
        model=PATHS.home_model("{home}"),
        questions=rules.fetch_mt_bench.output.questions,
    output:
        PATHS.home_eval("{home}", layout.MT_BENCH_ANSWERS),
        provenance=PATHS.provenance("generate_mt_bench_grid-{home}"),
    log:
        PATHS.log("{home}", "generate_mt_bench"),
    benchmark:
        PATHS.benchmark("{home}", "generate_mt_bench")
    params:
        **settings_params(
            "model",
            lambda w: GRID.learned_by(w.home, learning_settings),
            like=any_learned(),
        ),
        model_id=grid_model_id,
        max_new_tokens=MTB["max_new_tokens"],
        batch_size=EVAL["generation_batch_size"],


use rule judge_mt_bench as judge_mt_bench_grid with:
    input:
        answers=PATHS.home_eval("{home}", layout.MT_BENCH_ANSWERS),
        questions=rules.fetch_mt_bench.output.questions,
        judge_prompts=rules.fetch_mt_bench.output.judge_prompts,
        reference=rules.fetch_mt_bench.output.reference,
    output:
        PATHS.home_summary("{home}", "mtbench"),
        judgments=PATHS.home_eval("{home}", layout.MT_BENCH_JUDGMENTS),
        provenance=PATHS.provenance("judge_mt_bench_grid-{home}"),
    log:
        PATHS.log("{home}", "judge_mt_bench"),
    benchmark:
        PATHS.benchmark("{home}", "judge_mt_bench")
    params:
        **settings_params("judge", JUDGE.as_dict()),
        cache=PATHS.home_eval("{home}", layout.MT_BENCH_JUDGE_CACHE),


use rule generate_alpaca_eval as generate_alpaca_eval_grid with:
    input:
        model=PATHS.home_model("{home}"),
        data=rules.fetch_alpaca_eval.output[0],
    output:
        PATHS.home_eval("{home}", layout.ALPACA_EVAL_OUTPUTS),
        provenance=PATHS.provenance("generate_alpaca_eval_grid-{home}"),
    log:
        PATHS.log("{home}", "generate_alpaca_eval"),
    benchmark:
        PATHS.benchmark("{home}", "generate_alpaca_eval")
    params:
        **settings_params(
            "model",
            lambda w: GRID.learned_by(w.home, learning_settings),
            like=any_learned(),
        ),
        generator=grid_model_id,
        temperature=AE["temperature"],
        top_p=AE["top_p"],
        top_k=AE["top_k"],
        max_new_tokens=AE["max_new_tokens"],
        batch_size=EVAL["generation_batch_size"],


use rule judge_alpaca_eval as judge_alpaca_eval_grid with:
    input:
        outputs=PATHS.home_eval("{home}", layout.ALPACA_EVAL_OUTPUTS),
        data=rules.fetch_alpaca_eval.output[0],
    output:
        PATHS.home_summary("{home}", "alpacaeval"),
        provenance=PATHS.provenance("judge_alpaca_eval_grid-{home}"),
    log:
        PATHS.log("{home}", "judge_alpaca_eval"),
    benchmark:
        PATHS.benchmark("{home}", "judge_alpaca_eval")
    params:
        **settings_params("judge", ALPACA_EVAL_JUDGE.as_dict()),
        annotators=AE["annotators"],
        cache=PATHS.home_eval("{home}", layout.ALPACA_EVAL_CACHE),


use rule eval_leaderboard as eval_leaderboard_grid with:
    input:
        model=PATHS.home_model("{home}"),
        tasks=rules.fetch_leaderboard_data.output.tasks,
    output:
        PATHS.home_summary("{home}", layout.LEADERBOARD),
        provenance=PATHS.provenance("eval_leaderboard_grid-{home}"),
    log:
        PATHS.log("{home}", "eval_leaderboard"),
    benchmark:
        PATHS.benchmark("{home}", "eval_leaderboard")
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=grid_runtime("eval_leaderboard", 240),


rule report_experiments:
    """Every experiment side by side (mean ± spread over seeds), a plot per swept axis, the published rows."""
    input:
        evals=lambda w: GRID.eval_targets(),
    output:
        table=PATHS.experiments_report("table"),
        html=report(
            PATHS.experiments_report("html"),
            caption="../report/experiments.rst",
            category="Experiments",
        ),
        csv=PATHS.experiments_report("csv"),
        json=PATHS.experiments_report("json"),
        plots=[
            report(
                PATHS.experiments_plot(a),
                caption="../report/experiments.rst",
                category="Experiments",
            )
            for a in (GRID.swept_axes() if GRID else [])
        ],
        provenance=PATHS.provenance("report_experiments"),
    log:
        PATHS.log("report_experiments"),
    benchmark:
        PATHS.benchmark("report_experiments")
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    params:
        **settings_params(
            "experiments",
            lambda w: GRID.report_entries(learning_settings),
            like=[GRID.report_entries(learning_settings)] if GRID else [],
        ),
        axes=lambda w: GRID.swept_axes(),
        demo=config["demo"],
    script:
        "../scripts/report_experiments.py"
