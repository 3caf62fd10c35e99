from mamba_align import plan as planner
from mamba_align.utils import UserError


def profile_resources(rule):
    """The active profile's set-resources for `rule` (what the scheduler will be asked for)."""
    over = workflow.resource_settings.overwrite_resources.get(rule) or {}
    return dict(over.items()) if hasattr(over, "items") else {}


def gpu_type_of(rule):
    res = profile_resources(rule)
    label = f"{res.get('gpu_model', '')} {res.get('constraint', '')}".lower()
    for key, gpu_type in (
        ("h200", "H200"),
        ("h100", "H100-80GB"),
        ("a100", "A100-80GB"),
    ):
        if key in label:
            return "A100-40GB" if key == "a100" and "40" in label else gpu_type
    return config["plan"]["gpu_type"]


def training_gpus():
    return {r: int(profile_resources(r).get("gpu", 1)) for r in ("train_sft", "train_dpo")}


def current_plan():
    return planner.make_plan(config, SFT, DPO, training_gpus(), gpu_type_of("train_sft"), R)


def planned_runtime(rule, default):
    """Minutes to ask for: the plan's estimate plus the safety margin (default when not estimable)."""

    def runtime(wildcards, attempt):
        try:
            jobs = [j for j in current_plan()["jobs"] if j["rule"] == rule]
        except UserError:
            return default
        return jobs[0]["runtime_min"] if jobs else default

    return runtime


rule plan:
    """GPU-hours, wall time and memory per job, judge requests and cost, before anything runs."""
    input:
        demo_inputs(),
    output:
        json=f"{R}/plan.json",
        table=f"{R}/plan.txt",
    log:
        f"{R}/logs/plan.log",
    conda:
        "../envs/mamba-align.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    params:
        sft=SFT,
        dpo=DPO,
        gpus=training_gpus(),
        gpu_type=gpu_type_of("train_sft"),
    script:
        "../scripts/plan.py"
