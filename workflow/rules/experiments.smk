# Experiments of a grid (config `experiments`): the same rules, with outputs under folders keyed by what each
# job learns from (mamba_align.ops.store.experiments), so that work the experiments share runs once. Inactive (no
# target asks for these paths) when the config names no experiments.


use rule prepare_base_model as prepare_base_model_grid with:
    input:
        demo_inputs(),
    output:
        model=directory(f"{R}/shared/base/{{key}}/model"),
        report=f"{R}/shared/base/{{key}}/verify.json",
        provenance=f"{R}/provenance/prepare_base_model_grid-{{key}}.json",
    log:
        f"{R}/logs/shared/base/{{key}}/prepare_base_model.log",
    benchmark:
        f"{R}/benchmarks/shared/base/{{key}}/prepare_base_model.tsv"
    params:
        **settings_params(
            "base", grid_base, like=grid_like(lambda r: r.exp.base_model, BASE)
        ),


use rule prepare_sft_data as prepare_sft_data_grid with:
    input:
        demo_inputs(),
        model=lambda w: GRID.model(GRID.data_owner("sft", w.key), "base"),
    output:
        train=f"{R}/shared/data/sft/{{key}}/train.parquet",
        test=f"{R}/shared/data/sft/{{key}}/test.parquet",
        stats=f"{R}/shared/data/sft/{{key}}/stats.json",
        provenance=f"{R}/provenance/prepare_sft_data_grid-{{key}}.json",
    log:
        f"{R}/logs/shared/data/sft/{{key}}/prepare_sft_data.log",
    benchmark:
        f"{R}/benchmarks/shared/data/sft/{{key}}/prepare_sft_data.tsv"
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
        train=f"{R}/shared/data/dpo/{{key}}/train.parquet",
        test=f"{R}/shared/data/dpo/{{key}}/test.parquet",
        stats=f"{R}/shared/data/dpo/{{key}}/stats.json",
        provenance=f"{R}/provenance/prepare_preference_data_grid-{{key}}.json",
    log:
        f"{R}/logs/shared/data/dpo/{{key}}/prepare_preference_data.log",
    benchmark:
        f"{R}/benchmarks/shared/data/dpo/{{key}}/prepare_preference_data.tsv"
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
        model=directory(f"{R}/shared/sft/{{key}}/model"),
        metrics=f"{R}/shared/sft/{{key}}/metrics.json",
        provenance=f"{R}/provenance/train_sft_grid-{{key}}.json",
    log:
        f"{R}/logs/shared/sft/{{key}}/train_sft.log",
    benchmark:
        f"{R}/benchmarks/shared/sft/{{key}}/train_sft.tsv"
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
        **settings_params(
            "config",
            lambda w: GRID.stage_config(GRID.first_sft[w.key], "sft"),
            like=grid_like(lambda r: GRID.stage_config(r, "sft")),
        ),
        checkpoints=f"{R}/checkpoints",


use rule train_dpo as train_dpo_grid with:
    input:
        unpack(lambda w: grid_data_files("dpo", GRID.by_name[w.name])),
        model=lambda w: GRID.model(GRID.by_name[w.name], "sft"),
    output:
        model=directory(f"{R}/experiments/{{name}}/model"),
        metrics=f"{R}/experiments/{{name}}/metrics.json",
        provenance=f"{R}/provenance/train_dpo_grid-{{name}}.json",
    log:
        f"{R}/logs/experiments/{{name}}/train_dpo.log",
    benchmark:
        f"{R}/benchmarks/experiments/{{name}}/train_dpo.tsv"
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
        **settings_params(
            "config",
            lambda w: GRID.stage_config(GRID.by_name[w.name], "dpo"),
            like=grid_like(lambda r: GRID.stage_config(r, "dpo")),
        ),
        checkpoints=f"{R}/checkpoints",


use rule generate_mt_bench as generate_mt_bench_grid with:
    input:
        model=f"{R}/{{home}}/model",
        questions=rules.fetch_mt_bench.output.questions,
    output:
        f"{R}/{{home}}/eval/mt_bench_answers.jsonl",
        provenance=f"{R}/provenance/generate_mt_bench_grid-{{home}}.json",
    log:
        f"{R}/logs/{{home}}/generate_mt_bench.log",
    benchmark:
        f"{R}/benchmarks/{{home}}/generate_mt_bench.tsv"
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
        answers=f"{R}/{{home}}/eval/mt_bench_answers.jsonl",
        questions=rules.fetch_mt_bench.output.questions,
        judge_prompts=rules.fetch_mt_bench.output.judge_prompts,
        reference=rules.fetch_mt_bench.output.reference,
    output:
        f"{R}/{{home}}/eval/mtbench.json",
        judgments=f"{R}/{{home}}/eval/mt_bench_judgments.jsonl",
        provenance=f"{R}/provenance/judge_mt_bench_grid-{{home}}.json",
    log:
        f"{R}/logs/{{home}}/judge_mt_bench.log",
    benchmark:
        f"{R}/benchmarks/{{home}}/judge_mt_bench.tsv"
    params:
        **settings_params("judge", JUDGE.as_dict()),
        cache=f"{R}/{{home}}/eval/mt_bench_judge_cache.jsonl",


use rule generate_alpaca_eval as generate_alpaca_eval_grid with:
    input:
        model=f"{R}/{{home}}/model",
        data=rules.fetch_alpaca_eval.output[0],
    output:
        f"{R}/{{home}}/eval/alpaca_eval_outputs.json",
        provenance=f"{R}/provenance/generate_alpaca_eval_grid-{{home}}.json",
    log:
        f"{R}/logs/{{home}}/generate_alpaca_eval.log",
    benchmark:
        f"{R}/benchmarks/{{home}}/generate_alpaca_eval.tsv"
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
        outputs=f"{R}/{{home}}/eval/alpaca_eval_outputs.json",
        data=rules.fetch_alpaca_eval.output[0],
    output:
        f"{R}/{{home}}/eval/alpacaeval.json",
        provenance=f"{R}/provenance/judge_alpaca_eval_grid-{{home}}.json",
    log:
        f"{R}/logs/{{home}}/judge_alpaca_eval.log",
    benchmark:
        f"{R}/benchmarks/{{home}}/judge_alpaca_eval.tsv"
    params:
        **settings_params("judge", ALPACA_EVAL_JUDGE.as_dict()),
        annotators=AE["annotators"],
        cache=f"{R}/{{home}}/eval/alpaca_eval_cache",


use rule eval_leaderboard as eval_leaderboard_grid with:
    input:
        model=f"{R}/{{home}}/model",
        tasks=rules.fetch_leaderboard_data.output.tasks,
    output:
        f"{R}/{{home}}/eval/leaderboard.json",
        provenance=f"{R}/provenance/eval_leaderboard_grid-{{home}}.json",
    log:
        f"{R}/logs/{{home}}/eval_leaderboard.log",
    benchmark:
        f"{R}/benchmarks/{{home}}/eval_leaderboard.tsv"
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=grid_runtime("eval_leaderboard", 240),


rule report_experiments:
    """Every experiment side by side (mean ± spread over seeds), a plot per swept axis, the published rows."""
    input:
        evals=lambda w: GRID.eval_targets(),
    output:
        table=f"{R}/report/experiments/scores.md",
        html=report(
            f"{R}/report/experiments/scores.html",
            caption="../report/experiments.rst",
            category="Experiments",
        ),
        csv=f"{R}/report/experiments/scores.csv",
        json=f"{R}/report/experiments/scores.json",
        plots=[
            report(
                f"{R}/report/experiments/{experiments_of.plot_name(a)}",
                caption="../report/experiments.rst",
                category="Experiments",
            )
            for a in (GRID.swept_axes() if GRID else [])
        ],
        provenance=f"{R}/provenance/report_experiments.json",
    log:
        f"{R}/logs/report_experiments.log",
    benchmark:
        f"{R}/benchmarks/report_experiments.tsv"
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
