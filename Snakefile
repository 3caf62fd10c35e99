# mamba-align: SFT -> DPO -> MT-Bench / AlpacaEval for Mamba models.
# The Snakefile only wires; the work is done by the mamba_align package (src/).
# Real run:  snakemake --profile profiles/slurm --profile profiles/site results/eval/mtbench.json
#            (profiles/site/: your account and partition, from profiles/site.example/; optional)
# Demo:      snakemake --workflow-profile profiles/local --cores 2 --configfile config/demo.yaml   (make demo)
#            (always pass a profile: without one, Snakemake reruns every rule whose script was edited)


configfile: "config/config.yaml"


# Software: the rules' `conda:` env (workflow/envs/mamba-align.yaml, --sdm conda) or this image built from
# workflow/envs/mamba-align.def (--sdm apptainer); without --sdm, the environment snakemake runs in.
container: "workflow/envs/mamba-align.sif"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/mt_bench.smk"
include: "workflow/rules/alpaca_eval.smk"
include: "workflow/rules/leaderboard.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/experiments.smk"


rule all:
    default_target: True
    input:
        all_targets(),
