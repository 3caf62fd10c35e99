import glob
import os
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import min_version, validate

from mamba_align.eval.judge.client import check_judge
from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.ops.jobenv import condor_env, gpu_choice, jobenv
from mamba_align.ops.reporting import plan as planner
from mamba_align.ops.store import experiments as experiments_of
from mamba_align.ops.store import layout, provenance, rerun
from mamba_align.ops.store import runs as model_store
from mamba_align.ops.store.rerun import settings_params
from mamba_align.train import data as prepared_data
from mamba_align.train import recipes
from mamba_align.train.recipes import as_dict, learning_settings
from mamba_align.utils import UserError

min_version("9.0")

# the jobs snakemake starts import the executor plugins again: no htcondor2 warning where HTCondor is absent
condor_env.quiet_condor_config()

# Every job imports mamba_align from this checkout, also in a --sdm conda env or the container.
jobenv.use_checkout_source(os.path.join(workflow.basedir, "src"))


# one line naming the key and the schema's complaint, not snakemake's dump of the whole schema and config
try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as e:
    from mamba_align.ops.schema import config_error

    raise WorkflowError(config_error(e)) from None

R = config["results_dir"]
# every path under it (mamba_align.ops.store.layout)
PATHS = layout.Results(R)
# the recipe's chat template unless the config names one; a different one is an error
config["base_model"]["chat_template"] = recipes.resolve_chat_template(
    config, workflow.basedir
)
BASE = config["base_model"]
EVAL = config["eval"]


# Parsed strictly now, so a bad recipe fails before any job (and any GPU time).
# NaN / inf anywhere in the config first: the schema's bounds let NaN through (every comparison is false).
recipes.check_config_finite(config, workflow.configfiles)
# judge.*, read once into one object (eval/judge/settings.py: the schema's defaults, one validator): the start-up
# check, the judge rules' GPU count and both benchmarks' judge params (as_dict) come from it. AlpacaEval's judge is
# the same but for its model, eval.alpaca_eval.judge_model (said once per run by onstart).
try:
    JUDGE = JudgeSettings.from_config(config)
    ALPACA_EVAL_JUDGE = JUDGE.for_alpaca_eval(
        EVAL["alpaca_eval"]["judge_model"], logger=None
    )
except UserError as e:
    raise WorkflowError(str(e)) from None
SFT = as_dict(
    recipes.config_recipe(config, "sft", workflow.basedir, workflow.configfiles)
)
DPO = as_dict(
    recipes.config_recipe(config, "dpo", workflow.basedir, workflow.configfiles)
)


PASSED_ENV = (
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "MAMBA_ALIGN_ALLOW_SLOW_PATH",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)


def resolve_experiment(exp):
    ecfg = exp.config(config)
    sft, dpo = (
        as_dict(recipes.config_recipe(ecfg, s, workflow.basedir, workflow.configfiles))
        for s in ("sft", "dpo")
    )
    return experiments_of.resolve(exp, sft, dpo, learning_settings)


# The config's experiments (None: one experiment in the classic layout); recipes parsed strictly now too.
try:
    GRID = (
        experiments_of.Grid(
            R,
            [resolve_experiment(e) for e in experiments_of.expand(config)],
            EVAL["stages"],
            EVAL["leaderboard"]["stages"],
        )
        if experiments_of.is_grid(config)
        else None
    )
except UserError as e:
    raise WorkflowError(str(e)) from None


# Secrets reach cluster jobs through envvars (never config, logs or results).
# So do the operational switches a job reads (W&B, the kernels' opt-out, the Hugging Face cache).
envvars:
    *[v for v in ("HF_TOKEN", JUDGE.api_key_env) + PASSED_ENV if os.environ.get(v)],


onstart:
    # Checked before the first job (not in dry runs) when judge jobs will run, so a missing judge key
    # or an endpoint that does not answer (one GET {base_url}/models) fails before training, not after it.
    judging = {
        j.rule.name
        for j in workflow.dag.needrun_jobs()
        if j.rule.name.startswith("judge_")
    }
    if judging:
        try:
            check_judge(JUDGE, local_exec=workflow.local_exec, probe=True)
        except UserError as e:
            raise WorkflowError(f"{e}; checked before any job runs.") from None
    if judging & {"judge_alpaca_eval", "judge_alpaca_eval_grid"}:
        # AlpacaEval's judge model, where it is not judge.model: said once, on snakemake's log
        JUDGE.for_alpaca_eval(EVAL["alpaca_eval"]["judge_model"], logger=logger)
    # A score that this run will recompute is removed now, not when its job starts: a run that fails
    # before then (an interrupted retrain) leaves no stale score to be read as current.
    for job in workflow.dag.needrun_jobs():
        if job.rule.name.startswith(
            ("judge_mt_bench", "judge_alpaca_eval", "report")
        ):
            for f in job.output:
                Path(f).unlink(missing_ok=True)
    # What this run reads at a branch, from the recipes parsed above: written once here, before any job, and
    # pointed at by every job's provenance record (no job parses the recipes again for it).
    provenance.write_run_unpinned(PATHS.unpinned(), config, SFT, DPO, GRID)


# Downloads and judge API calls run where snakemake runs (compute nodes often have no internet);
# they hold no GPU, except a local judge on CUDA, which onstart allows only where jobs run locally.
localrules:
    build_demo_inputs,
    plan,
    fetch_mt_bench,
    fetch_alpaca_eval,
    fetch_leaderboard_data,
    judge_mt_bench,
    judge_alpaca_eval,
    report,
    judge_mt_bench_grid,
    judge_alpaca_eval_grid,
    report_experiments,


wildcard_constraints:
    stage="|".join(layout.STAGES),
    stagedir="(base/|sft/)?",
    key=layout.KEY_PATTERN,
    name=layout.NAME_PATTERN,
    home=layout.home_pattern(),


def demo_inputs():
    return [PATHS.demo()] if config["demo"] else []


def built_by_demo(local_dir):
    """The demo's inputs when a benchmark's local_dir lies inside them (the rehearsal's question sets)."""
    inside = local_dir and Path(local_dir).is_relative_to(PATHS.demo())
    return demo_inputs() if inside else []


def model_of(stage):
    return PATHS.model(stage)


def model_for(wildcards):
    return model_of(wildcards.stage)


def learned_by(stage):
    """What the model of `stage` learned from, as known before anything runs: the base model and each stage's
    learning settings up to `stage`. Generation rules carry it as a param, so an evaluation reruns whenever
    its model is to change, even after a failed retrain has left no model to compare dates with; judge rules
    record its key (provenance.model_key) in the score, which `mamba-align status` and the report compare
    with the current config's.
    """
    return provenance.learned_by(stage, BASE, SFT, DPO)


def any_learned():
    """Chains a `model` param may hold (the config's last stage, each experiment's): the settings that
    settings_params names one by one in a rerun's reason."""
    return grid_like(
        lambda r: GRID.learned_by(GRID.home(r, "dpo"), learning_settings),
        learned_by("dpo"),
    )


def grid_like(value_of, *classic):
    """`classic` and value_of(each experiment of the grid): what a grid rule's settings param may hold; the
    classic rule's value among them, so that every setting param of the rule it uses is overridden.
    """
    return [*classic, *(value_of(r) for r in (GRID.exps if GRID else []))]


def scored_learned_by(w):
    """What the model a judge job scores learned from (classic layout or a grid's model folder): its key
    goes into the score, for status and the report to compare with the current config's.
    """
    if hasattr(w, "home"):
        return GRID.learned_by(w.home, learning_settings)
    return learned_by(layout.stage_of(w.stagedir))


def scored_model_dir(w):
    """The model folder a judge job's answers came from (its run.json key goes into the score)."""
    if hasattr(w, "home"):
        return PATHS.home_model(w.home)
    return model_of(layout.stage_of(w.stagedir))


def answers_for(name):
    """Input function: the per-stage generation output a judge rule reads."""
    return lambda w: PATHS.stage_eval(layout.stage_of(w.stagedir), name)


def all_targets():
    """Every score, the report and the plan: of the one experiment, or of every experiment of the grid."""
    if GRID:
        return [
            *GRID.eval_targets(),
            *rules.report_experiments.output,
            *rules.plan.output,
        ]
    return [
        *(PATHS.eval_summary(s, b) for s in EVAL["stages"] for b in layout.BENCHMARKS),
        *(
            PATHS.eval_summary(s, layout.LEADERBOARD)
            for s in EVAL["leaderboard"]["stages"]
        ),
        *rules.report.output,
        *rules.plan.output,
    ]


def profile_resources(rule):
    """The active profile's set-resources for `rule` (what the scheduler will be asked for)."""
    over = workflow.resource_settings.overwrite_resources.get(rule) or {}
    items = over.items() if hasattr(over, "items") else []
    return {k: getattr(v, "raw", v) for k, v in items}


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


def training_gpu_counts(rule):
    """The GPU counts a training job may run on, largest first: the profile's `gpu_counts` (auto, or a list
    such as '8,4,2'), else its `gpu` (one count); each refused now if it cannot keep the recipe's global batch.
    """
    res = profile_resources(rule)
    raw = res.get("gpu_counts", res.get("gpu", 1))
    counts = gpu_choice.parse_setting(str(raw).strip("'\""), rule)
    stage = "sft" if rule.startswith("train_sft") else "dpo"
    recipes_of = [{"sft": SFT, "dpo": DPO}[stage]]
    if rule.endswith("_grid") and GRID:
        recipes_of = [getattr(r, stage) for r in GRID.exps]
    for recipe in recipes_of:
        gpu_choice.check_counts(counts, recipe["global_batch_size"], rule)
    return counts


def training_gpus():
    return {r: training_gpu_counts(r)[0] for r in ("train_sft", "train_dpo")}


# (rule, wildcards, attempt) -> the choice made when that job was submitted
GPU_CHOICES = {}


def training_gpu_request(rule):
    """`gpu` of a training job: chosen when the job is submitted (each retry anew) from what the scheduler has
    free on one node (mamba_align.ops.jobenv.gpu_choice); the choice and why go to the rule's log. Inside the job, where
    Snakemake evaluates it again, the count the scheduler gave the job."""
    counts, chosen = training_gpu_counts(rule), GPU_CHOICES

    def gpu(wildcards, attempt):
        if not workflow.is_main_process:  # inside the job: what it was given
            return gpu_choice.granted_gpus() or counts[0]
        # gpu and request_gpus: one choice
        key = (rule, tuple(wildcards.items()), attempt)
        if key not in chosen:
            plugin = workflow.executor_plugin
            executor = getattr(plugin, "name", "local") if plugin else "local"
            chosen[key] = gpu_choice.choose_gpus(
                executor, counts, profile_resources(rule)
            )
            gpu_choice.record(chosen[key], rule, wildcards, attempt, R, workflow.dryrun)
        return chosen[key].gpus

    return gpu


def current_plan():
    return planner.make_plan(
        config, SFT, DPO, training_gpus(), gpu_type_of("train_sft"), R
    )


def planned_runtime(rule, default):
    """Minutes to ask for: the plan's estimate plus the safety margin (default when not estimable)."""

    def runtime(wildcards, attempt):
        try:
            jobs = [j for j in current_plan()["jobs"] if j["rule"] == rule]
        except UserError:
            return default
        # at least 30 min: more than the 15-min lead of the profile's pre-emption signal
        return max(jobs[0]["runtime_min"], 30) if jobs else default

    return runtime


# Input functions of the leaderboard's rules (leaderboard.smk).


def leaderboard_task_files():
    """The include_path's task YAMLs and data (the demo's): an edit reruns the fetch and the scores."""
    folder = EVAL["leaderboard"]["include_path"]
    return sorted(glob.glob(f"{folder}/*")) if folder else []


def leaderboard_runtime(wildcards, attempt):
    """Minutes to ask for: the plan's estimate for the configured tasks (at least 30), else 4 hours."""
    try:
        jobs = [j for j in current_plan()["jobs"] if j["rule"] == "eval_leaderboard"]
    except UserError:
        return 240
    return max(jobs[0]["runtime_min"], 30) if jobs else 240


# Input functions of the experiments' rules (experiments.smk).


def grid_base(w):
    return GRID.first_base[w.key].exp.base_model


def grid_data(stage, field):
    return lambda w: getattr(GRID.data_owner(stage, w.key), stage)[field]


def grid_data_files(stage, experiment):
    files = GRID.data_files(experiment, stage)
    return {f: files[f] for f in ("train", "test")}


def grid_runtime(rule, default):
    """Minutes to ask for, from the plan of the experiment the job belongs to: each job sized by its model."""

    def runtime(wildcards, attempt):
        r = GRID.plan_owner(rule, wildcards)
        try:
            plan = planner.make_plan(
                r.exp.config(config),
                r.sft,
                r.dpo,
                training_gpus(),
                gpu_type_of(rule),
                R,
                verify=GRID.base_verify(r),
                data_dirs={s: GRID.data_dir(r, s) for s in ("sft", "dpo")},
            )
        except UserError:
            return default
        jobs = [j for j in plan["jobs"] if j["rule"] == rule]
        return max(jobs[0]["runtime_min"], 30) if jobs else default

    return runtime


def grid_model_id(w):
    r, stage = GRID.owner(w.home)
    return f"{r.name}-{stage}" if stage == "dpo" else f"{stage}-{w.home.split('/')[-1]}"


def local_source(dataset):
    """A local dataset that no rule builds (outside the results folder) as a param holding a digest of its files'
    names, sizes and times: an edit, even one that keeps the folder's own time, reruns the data step. A Hub
    dataset adds nothing here (its revision is a param; its commit is checked before training).
    """
    source = dataset["source"]
    if Path(source).resolve().is_relative_to(Path(R).resolve()):
        return {}  # the demo's inputs, built by the workflow, whose output times decide
    digest = prepared_data.local_source_digest(source)
    return {"source_files": digest} if digest else {}


def grid_local_source(stage):
    """local_source of each data key of a grid's `stage` (sft or dpo), in place of the one a grid's data step
    inherits from the config's dataset. Adds nothing when neither is a local source, so the params Snakemake
    recorded for Hub and demo grids stay the same.
    """
    digests = {
        k: local_source(getattr(r, stage)["dataset"]).get("source_files")
        for (s, k), r in (GRID.first_data.items() if GRID else ())
        if s == stage
    }
    inherited = local_source({"sft": SFT, "dpo": DPO}[stage]["dataset"])
    if not any(digests.values()) and not inherited:
        return {}
    return {"source_files": lambda w: digests.get(w.key)}


# Snakemake touches a job's outputs after it: a data step's byte-identical rewrite gets its earlier time back
# here, at the next parse, before the DAG compares times (mamba_align.train.data.record_outputs).
# A model link whose stored model was deleted (to retrain its key) is dropped: a missing output, not an error.
# Snakemake's records of params in an earlier form (whole dicts) are translated to settings_params' form
# (mamba_align.ops.store.rerun): a finished run does not rerun for the new form; a changed setting still does.
if workflow.is_main_process:
    note = rerun.migration_note(rerun.migrate_records())
    if note:
        print(note, file=sys.stderr)
    for d in [PATHS.train_data_dir(s) for s in ("sft", "dpo")] + glob.glob(
        PATHS.train_data_dir("*", "*")
    ):
        prepared_data.settle_kept_mtimes(d)
    for link in model_store.drop_dangling_links(R):
        print(
            f"{link}: its stored model was deleted; the link is removed",
            file=sys.stderr,
        )
