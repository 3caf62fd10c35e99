# A trained model lives in results/models/<stage>-<key>/ and the declared output results/models/<stage> is a
# symlink to it; the key hashes what the stage learns from (settings, data, parent model; mamba_align.ops.store.runs).
# A --forcerun or a failed retrain deletes only the symlink; retraining a key keeps its earlier model as
# <stage>-<key>.previous. Training resumes from its newest complete checkpoint
# (results/checkpoints/<stage>-<key>/, not a declared output, so a failed or pre-empted job keeps it for the
# retry); a finished run's checkpoints are deleted once its model is stored.
# The GPU count is chosen at each submission from the profile's `gpus` (auto or a list: the largest count one
# node has free now) or fixed by its `gpu`; the recipe's global batch holds whatever it is, through gradient
# accumulation, and a run resumes on another count (training_gpu_request in common.smk).


rule train_sft:
    """Supervised fine-tuning (TRL SFTTrainer) of the base model."""
    input:
        model=model_of("base"),
        train=rules.prepare_sft_data.output.train,
        test=rules.prepare_sft_data.output.test,
    output:
        model=directory(model_of("sft")),
        metrics=PATHS.metrics("sft"),
        provenance=PATHS.provenance("train_sft"),
    log:
        PATHS.log("train_sft"),
    benchmark:
        PATHS.benchmark("train_sft")
    conda:
        "../envs/mamba-align.yaml"
    threads: 2
    resources:
        gpu=training_gpu_request("train_sft"),
        request_gpus=training_gpu_request("train_sft"),
        mem_mb=32000,
        runtime=planned_runtime("train_sft", 60),
    params:
        # recorded, the rerun trigger: what is learned only, so an operational change (batch size,
        # save_steps...) reruns nothing
        **settings_params("recipe", learning_settings(SFT)),
        # what the job runs with, operational keys too: an object, of which Snakemake records nothing
        job_recipe=recipes.recipe_of("sft", SFT),
        checkpoints=PATHS.checkpoints(),
    script:
        "../scripts/train_sft.py"


rule train_dpo:
    """Direct preference optimisation (TRL DPOTrainer) of the SFT model against itself as reference."""
    input:
        model=model_of("sft"),
        train=rules.prepare_preference_data.output.train,
        test=rules.prepare_preference_data.output.test,
    output:
        model=directory(model_of("dpo")),
        metrics=PATHS.metrics("dpo"),
        provenance=PATHS.provenance("train_dpo"),
    log:
        PATHS.log("train_dpo"),
    benchmark:
        PATHS.benchmark("train_dpo")
    conda:
        "../envs/mamba-align.yaml"
    threads: 2
    resources:
        gpu=training_gpu_request("train_dpo"),
        request_gpus=training_gpu_request("train_dpo"),
        mem_mb=32000,
        runtime=planned_runtime("train_dpo", 60),
    params:
        **settings_params("recipe", learning_settings(DPO)),
        job_recipe=recipes.recipe_of("dpo", DPO),
        checkpoints=PATHS.checkpoints(),
    script:
        "../scripts/train_dpo.py"
