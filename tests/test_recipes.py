"""Shipped recipes load strictly and carry the numbers of their sources (config/recipes/README.md)."""

from pathlib import Path

import pytest

from mamba_align.train.recipes import DPORecipe, SFTRecipe, gradient_accumulation_steps, load_recipe, parse_overrides
from mamba_align.utils import UserError

RECIPES = Path(__file__).resolve().parents[1] / "config" / "recipes"

# (recipe, stage): expected values, from the Zephyr paper (section 4) and the alignment-handbook files cited in
# config/recipes/README.md. Per-device sizes, logging and save steps are ours and not checked here.
EXPECTED = {
    ("zephyr-7b-beta", "sft"): dict(
        dataset=("HuggingFaceH4/ultrachat_200k", "train_sft", "test_sft"), num_train_epochs=1.0,
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_ratio=0.1, weight_decay=0.0, optim="adamw_torch",
        global_batch_size=512, max_seq_length=2048, packing=True, bf16=True, seed=42),
    ("zephyr-7b-beta", "dpo"): dict(
        dataset=("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs"), num_train_epochs=3.0,
        learning_rate=5e-7, lr_scheduler_type="linear", warmup_ratio=0.1, weight_decay=0.0, optim="rmsprop",
        global_batch_size=32, beta=0.1, loss_type="sigmoid", max_length=1024, max_prompt_length=512, bf16=True,
        seed=42),
    ("zephyr-7b-beta-2024", "sft"): dict(
        dataset=("HuggingFaceH4/ultrachat_200k", "train_sft", "test_sft"), num_train_epochs=1.0,
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_ratio=0.1, optim="adamw_torch",
        global_batch_size=128, max_seq_length=2048, packing=True),
    ("zephyr-7b-beta-2024", "dpo"): dict(
        dataset=("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs"), num_train_epochs=1.0,
        learning_rate=5e-7, lr_scheduler_type="cosine", warmup_ratio=0.1, optim="adamw_torch",
        global_batch_size=128, beta=0.01, loss_type="sigmoid", max_length=1024, max_prompt_length=512),
    ("zephyr-7b-gemma", "sft"): dict(
        dataset=("HuggingFaceH4/deita-10k-v0-sft", "train_sft", "test_sft"), num_train_epochs=3.0,
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_ratio=0.1, optim="adamw_torch",
        global_batch_size=128, max_seq_length=2048, packing=True),
    ("zephyr-7b-gemma", "dpo"): dict(
        dataset=("argilla/dpo-mix-7k", "train", "test"), num_train_epochs=2.0, learning_rate=5e-7,
        lr_scheduler_type="cosine", warmup_ratio=0.1, optim="adamw_torch", global_batch_size=128, beta=0.05,
        loss_type="sigmoid", max_length=1024, max_prompt_length=512),
    ("demo", "sft"): dict(global_batch_size=8, per_device_train_batch_size=4, max_seq_length=128, bf16=False,
                          packing=True),
    ("demo", "dpo"): dict(global_batch_size=8, per_device_train_batch_size=4, max_length=128, bf16=False),
}


@pytest.mark.parametrize("name,stage", sorted(EXPECTED))
def test_recipe_matches_its_source(name, stage):
    recipe = load_recipe(RECIPES / name, stage)
    assert isinstance(recipe, SFTRecipe if stage == "sft" else DPORecipe)
    for key, want in EXPECTED[(name, stage)].items():
        if key == "dataset":
            assert (recipe.dataset.source, recipe.dataset.train_split, recipe.dataset.test_split) == want
        else:
            assert getattr(recipe, key) == want, f"{name}/{stage}.yaml {key}"
    # the global batch must be reachable on 1 and 2 GPUs (and 8 for the real recipes)
    for gpus in (1, 2) if name == "demo" else (1, 2, 8):
        gradient_accumulation_steps(recipe, gpus)
    assert recipe.save_steps > 0


def test_every_shipped_recipe_is_covered():
    shipped = {(p.parent.name, p.stem) for p in RECIPES.glob("*/*.yaml")}
    assert shipped == set(EXPECTED)
    assert (RECIPES / "README.md").exists()


def test_unknown_key_is_named(tmp_path):
    text = (RECIPES / "demo" / "sft.yaml").read_text() + "learning_rat: 0.1\n"
    (tmp_path / "sft.yaml").write_text(text)
    with pytest.raises(UserError, match="learning_rat"):
        load_recipe(tmp_path, "sft")


def test_unknown_nested_and_override_keys_are_named():
    with pytest.raises(UserError, match="revison"):
        load_recipe(RECIPES / "demo", "dpo", {"dataset": {"revison": "abc"}})
    with pytest.raises(UserError, match="betta"):
        load_recipe(RECIPES / "demo", "dpo", {"betta": 0.2})


def test_wrong_type_is_named():
    with pytest.raises(UserError, match="global_batch_size"):
        load_recipe(RECIPES / "demo", "sft", {"global_batch_size": "eight"})


def test_overrides_from_the_command_line():
    over = parse_overrides(["max_steps=3", "learning_rate=2e-5", "dataset.revision=abc", "eval_steps=null"])
    assert over == {"max_steps": 3, "learning_rate": "2e-5", "dataset": {"revision": "abc"}, "eval_steps": None}
    recipe = load_recipe(RECIPES / "demo", "sft", over)
    assert (recipe.max_steps, recipe.learning_rate, recipe.dataset.revision) == (3, 2e-5, "abc")
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["max_steps"])


@pytest.mark.parametrize("gpus,accumulation", [(1, 256), (2, 128), (8, 32)])  # 512 rows, 2 per device
def test_accumulation_keeps_the_global_batch(gpus, accumulation):
    recipe = load_recipe(RECIPES / "zephyr-7b-beta", "sft")
    assert gradient_accumulation_steps(recipe, gpus) == accumulation
    with pytest.raises(UserError, match="not divisible"):
        gradient_accumulation_steps(recipe, 3)


# (stage, override, expected message): each rejected when the recipe is parsed, naming the key and what is allowed.
BAD_VALUES = [
    ("sft", {"learning_rate": -1e-3}, r"learning_rate is -0\.001; expected a number > 0"),
    ("dpo", {"global_batch_size": 0}, r"global_batch_size is 0; expected a number > 0"),
    ("sft", {"num_train_epochs": -1}, r"num_train_epochs is -1\.0; expected a number > 0"),
    ("sft", {"max_seq_length": 0}, r"max_seq_length is 0; expected a number > 0"),
    ("dpo", {"beta": -0.1}, r"beta is -0\.1; expected a number > 0"),
    ("sft", {"per_device_train_batch_size": 0}, r"per_device_train_batch_size is 0; expected a number > 0"),
    ("dpo", {"per_device_eval_batch_size": 0}, r"per_device_eval_batch_size is 0; expected a number > 0"),
    ("sft", {"save_steps": 0}, r"save_steps is 0; expected a number > 0"),
    ("sft", {"logging_steps": -5}, r"logging_steps is -5; expected a number > 0"),
    ("dpo", {"save_total_limit": 0}, r"save_total_limit is 0; expected a number > 0"),
    ("sft", {"eval_steps": 0}, r"eval_steps is 0; expected a number > 0"),
    ("sft", {"dataset": {"max_train_samples": 0}}, r"dataset\.max_train_samples is 0; expected a number > 0"),
    ("dpo", {"max_length": 0}, r"max_length is 0; expected a number > 0"),
    ("sft", {"weight_decay": -0.01}, r"weight_decay is -0\.01; expected a number >= 0"),
    ("sft", {"max_grad_norm": -1.0}, r"max_grad_norm is -1\.0; expected a number >= 0"),
    ("sft", {"warmup_ratio": 1.5}, r"warmup_ratio is 1\.5; expected a fraction of training in \[0, 1\]"),
    ("sft", {"max_steps": 0}, r"max_steps is 0; expected -1 \(train num_train_epochs\) or > 0"),
    ("dpo", {"max_prompt_length": 128}, r"max_prompt_length 128 leaves no room for the reply; expected less than "
                                        r"max_length 128"),
    ("sft", {"optim": "adamw_torchh"}, r"optim is 'adamw_torchh' \(did you mean 'adamw_torch'\?\); the installed "
                                       r"transformers accepts: adamw_torch, .*rmsprop"),
    ("sft", {"lr_scheduler_type": "cosinee"}, r"lr_scheduler_type is 'cosinee' \(did you mean 'cosine'\?\); the "
                                              r"installed transformers accepts: linear, cosine, "),
    ("dpo", {"loss_type": "sigmoidd"}, r"loss_type is 'sigmoidd' \(did you mean 'sigmoid'\?\); the installed trl "
                                       r"accepts: sigmoid, hinge, ipo, "),
    ("sft", {"global_batch_size": 8, "per_device_train_batch_size": 3},
     r"global_batch_size 8 is not divisible by per_device_train_batch_size 3"),
    ("sft", {"learnin_rate": 0.1}, r"unknown key\(s\) learnin_rate \(did you mean 'learning_rate'\?\)"),
    ("dpo", {"dataset": {"revison": "abc"}}, r"unknown key\(s\) dataset\.revison \(did you mean 'revision'\?\)"),
    ("sft", {"packing": "yes"}, r"packing: expected bool, got 'yes'"),
]


@pytest.mark.parametrize("stage, override, expected", BAD_VALUES, ids=[str(c[1]) for c in BAD_VALUES])
def test_bad_recipe_value_is_rejected_at_parse_naming_file_key_and_expected(stage, override, expected):
    with pytest.raises(UserError, match=expected) as e:
        load_recipe(RECIPES / "demo", stage, override)
    assert f"{stage}.yaml" in str(e.value)


def test_accepted_names_are_what_transformers_accepts():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from mamba_align.train.recipes import accepted_names

    assert list(accepted_names("optim")) == [o.value for o in OptimizerNames]
    assert list(accepted_names("lr_scheduler_type")) == [s.value for s in SchedulerType]


def test_accepted_loss_types_are_what_trl_lists():
    import re

    from trl import DPOConfig

    from mamba_align.train.recipes import accepted_names

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = re.findall(r"`'(\w+)'`", help_text.split("If multiple")[0])
    assert len(listed) > 5 and set(listed) == set(accepted_names("loss_type"))


def test_override_typo_names_the_config_key_and_file():
    from mamba_align.train.recipes import config_recipe

    config = {"recipe": "demo", "recipe_overrides": {"sft": {"learnin_rate": 0.1}}}
    with pytest.raises(UserError, match=r"the config \(my\.yaml\): unknown key\(s\) "
                                        r"recipe_overrides\.sft\.learnin_rate \(did you mean 'learning_rate'\?\)"):
        config_recipe(config, "sft", RECIPES.parents[1], ["my.yaml"])
    config["recipe_overrides"] = {"sft": {"learning_rate": -1}}
    with pytest.raises(UserError, match=r"sft\.yaml with recipe_overrides\.sft in the config \(my\.yaml\): "
                                        r"learning_rate is -1\.0; expected a number > 0"):
        config_recipe(config, "sft", RECIPES.parents[1], ["my.yaml"])


# ------------------------------------------------------------------------------- NaN and inf (issue #28, §2)
# YAML's .inf / .nan read as float inf / nan and pass every bound (NaN compares false with everything): a DPO beta
# of .inf trained a model of NaN weights, marked done, that failed only at generation.
NON_FINITE = [("dpo", "beta", float("inf")), ("sft", "learning_rate", float("nan")),
              ("dpo", "warmup_ratio", float("nan")), ("sft", "max_grad_norm", float("-inf")),
              ("sft", "num_train_epochs", float("inf"))]


@pytest.mark.parametrize("stage, key, value", NON_FINITE, ids=[f"{c[0]}.{c[1]}={c[2]}" for c in NON_FINITE])
def test_non_finite_override_names_the_config_key(stage, key, value):
    from mamba_align.train.recipes import config_recipe

    config = {"recipe": "demo", "recipe_overrides": {stage: {key: value}}}
    with pytest.raises(UserError, match=rf"the config \(my\.yaml\): recipe_overrides\.{stage}\.{key} is "
                                        rf"{value!r}; expected a finite number"):
        config_recipe(config, stage, RECIPES.parents[1], ["my.yaml"])


@pytest.mark.parametrize("text", [".inf", ".nan", "-.inf", "nan", "inf", "1e999"])
def test_non_finite_in_a_recipe_file_names_the_file_and_key(tmp_path, text):
    # .inf / .nan are YAML floats; nan / inf / 1e999 are strings that float() would read as non-finite
    (tmp_path / "dpo.yaml").write_text((RECIPES / "demo" / "dpo.yaml").read_text().replace(
        "beta: 0.1", f"beta: {text}"))
    assert f"beta: {text}" in (tmp_path / "dpo.yaml").read_text()
    with pytest.raises(UserError, match=r"dpo\.yaml.*beta(:| is) .*expected a finite number"):
        load_recipe(tmp_path, "dpo")


@pytest.mark.parametrize("override", [{"learning_rate": "nan"}, {"warmup_ratio": float("nan")},
                                      {"beta": float("inf")}])
def test_non_finite_from_the_command_line_or_a_job_is_refused(override):
    from mamba_align.train.recipes import as_dict, recipe_of

    with pytest.raises(UserError, match=r"dpo\.yaml with overrides\.\w+: expected a finite number"):
        load_recipe(RECIPES / "demo", "dpo", override)
    # the recipe object a training rule hands its job refuses it too
    with pytest.raises(UserError, match=r"recipe dpo\.\w+: expected a finite number"):
        recipe_of("dpo", {**as_dict(load_recipe(RECIPES / "demo", "dpo")), **override})


def test_the_whole_config_is_walked_for_non_finite_numbers_cheaply():
    import time

    import yaml

    from mamba_align.train.recipes import check_config_finite

    config = yaml.safe_load((RECIPES.parent / "config.yaml").read_text())
    check_config_finite(config, ["config/config.yaml"])  # the shipped config passes
    for patch, key in [({"judge": {"temperature": float("nan")}}, "judge.temperature"),
                       ({"plan": {"safety_margin": float("inf")}}, "plan.safety_margin"),
                       ({"experiments": {"grid": {"dpo": {"beta": [0.1, float("inf")]}}}},
                        r"experiments\.grid\.dpo\.beta\[1\]"),
                       ({"experiments": {"list": [{"name": "a", "recipe_overrides": {"sft": {"seed": 1,
                                                   "learning_rate": float("nan")}}}]}},
                        r"experiments\.list\[0\]\.recipe_overrides\.sft\.learning_rate")]:
        with pytest.raises(UserError, match=rf"the config \(a\.yaml, b\.yaml\): {key} is (nan|inf); "
                                            r"expected a finite number"):
            check_config_finite({**config, **patch}, ["a.yaml", "b.yaml"])
    started = time.perf_counter()
    for _ in range(100):
        check_config_finite(config)
    assert time.perf_counter() - started < 1.0  # ~20 µs a walk: nothing to notice at every workflow parse
