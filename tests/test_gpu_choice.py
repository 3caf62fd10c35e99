"""The GPU count a training job asks for (mamba_align.ops.jobenv.gpu_choice), from fake sinfo / condor_status
outputs."""

from __future__ import annotations

import json
import re

import pytest

from mamba_align.ops.jobenv import gpu_choice as gc
from mamba_align.utils import UserError

# sinfo -N -h -O NodeHost:|,StateCompact:|,Gres:|,GresUsed:|,features_act:|,Memory:|,AllocMem:| (Slurm 22.05's
# own output, as on the CI's fake node with GPU_COUNT=4, plus nodes a real cluster has)
SINFO = """\
a01|mix|gpu:a100:8(S:0-1)|gpu:a100:6(IDX:0-5)|a100_80gb,ib|1000000|200000|
a02|mix|gpu:a100:8(S:0-1)|gpu:a100:4(IDX:0-3)|a100_80gb,ib|1000000|900000|
a03|drain|gpu:a100:8(S:0-1)|gpu:a100:0(IDX:N/A)|a100_80gb|1000000|0|
b01|idle|gpu:a100:4(S:0)|gpu:a100:0(IDX:N/A)|a100_40gb|500000|0|
b02|alloc|gpu:a100:4(S:0)|gpu:a100:1(IDX:0)|a100_40gb|500000|0|
h01|idle|gpu:h100:8(S:0-1)|gpu:h100:0(IDX:N/A)|h100|2000000|0|
"""
# condor_status -constraint 'PartitionableSlot =?= true' -af Machine Gpus Memory '(require_gpus) =?= true'
CONDOR = """\
gpu01.example.org 2 900000 true
gpu02.example.org 4 300000 true
gpu03.example.org 8 900000 false
cpu01.example.org 0 200000 undefined
"""


@pytest.mark.parametrize("value, counts", [("auto", [8, 4, 2, 1]), ("8,4,2", [8, 4, 2]), ("[2, 8, 4]", [8, 4, 2]),
                                           (4, [4]), ("1", [1])])
def test_the_profiles_setting(value, counts):
    assert gc.parse_setting(value) == counts


@pytest.mark.parametrize("value", ["many", "0", "", "8,x"])
def test_a_bad_setting_names_the_rule(value):
    with pytest.raises(UserError, match="train_sft: gpu_counts"):
        gc.parse_setting(value, "train_sft")


def test_a_count_that_cannot_keep_the_global_batch_is_refused_with_the_nearest():
    gc.check_counts([8, 4, 2, 1], 128, "train_dpo")
    with pytest.raises(UserError, match=r"train_dpo: 3 GPUs cannot keep .* 128 .* nearest valid counts: 2, 4"):
        gc.check_counts([8, 3], 128, "train_dpo")
    with pytest.raises(UserError, match="nearest valid counts: 4, 8"):
        gc.check_counts([6], 32, "train_sft")
    with pytest.raises(UserError, match="nearest valid counts: 8$|nearest valid counts: 8 "):
        gc.check_counts([16], 8, "train_sft")


@pytest.mark.parametrize("n, layout", [(1, (4, 8)), (2, (4, 4)), (4, (4, 2)), (8, (4, 1))])
def test_accumulation_keeps_the_global_batch(n, layout):
    assert gc.batch_layout(32, 4, n) == layout


def test_per_device_batch_shrinks_where_the_recipes_does_not_divide():
    assert gc.batch_layout(8, 4, 8) == (1, 1)  # 1 row per process per step
    assert gc.batch_layout(24, 8, 4) == (6, 1)
    with pytest.raises(UserError, match="nearest valid counts: 2, 4"):
        gc.batch_layout(8, 4, 3)


def test_slurm_free_gpus_per_node_of_the_type_features_and_memory():
    assert gc.slurm_free(SINFO, "a100", "a100_80gb", 400000) == {"a01": 2}  # a02 lacks memory, a03 drains
    assert gc.slurm_free(SINFO, "a100", "a100_80gb", None) == {"a01": 2, "a02": 4}
    assert gc.slurm_free(SINFO, "a100", None, None) == {"a01": 2, "a02": 4, "b01": 4, "b02": 0}  # b02: no CPU
    assert gc.slurm_free(SINFO, None, "h100|a100_40gb", None) == {"b01": 4, "b02": 0, "h01": 8}


@pytest.mark.parametrize("resources, gpus, why", [
    ({"gpu_model": "a100", "constraint": "a100_80gb", "mem_mb": 400000}, 2, "2 free on one node"),
    ({"gpu_model": "a100", "constraint": "a100_80gb"}, 4, "4 free on one node"),
    ({"gpu_model": "h100"}, 8, "8 free on one node"),
    ({"gpu_model": "v100"}, 8, "none of .* fits now; asking for 8 and queueing"),
])
def test_slurm_choice_is_the_largest_count_free_on_one_node(resources, gpus, why):
    asked = []
    choice = gc.choose_gpus("slurm", [8, 4, 2], resources, run=lambda cmd: asked.append(cmd) or SINFO)
    assert asked == [gc.SINFO]
    assert choice.gpus == gpus
    assert re.search(why, choice.reason), choice.reason


def test_condor_choice_reads_partitionable_slots_and_require_gpus():
    asked = []
    require = "Capability >= 8.0 && GlobalMemoryMb >= 80000"
    choice = gc.choose_gpus("htcondor", [8, 4, 2], {"require_gpus": require, "request_memory": 400000},
                            run=lambda cmd: asked.append(cmd) or CONDOR)
    assert asked[0][-1] == "(GPUs_Capability >= 8.0 && GPUs_GlobalMemoryMb >= 80000) =?= true"
    assert (choice.gpus, "condor_status" in choice.reason) == (2, True)  # gpu02 lacks memory, gpu03 the GPU
    assert gc.condor_free(CONDOR, None) == {"gpu01.example.org": 2, "gpu02.example.org": 4}


def test_no_answer_from_the_scheduler_asks_for_the_first_count():
    choice = gc.choose_gpus("slurm", [8, 4], {}, run=lambda cmd: None)
    assert choice.gpus == 8 and "could not be asked" in choice.reason
    assert gc.choose_gpus("local", [4, 2], {}).gpus == 4
    assert gc.choose_gpus("slurm", [2], {}, run=lambda cmd: pytest.fail("a fixed count asks nothing")).gpus == 2


def test_missing_sinfo_is_no_answer(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gc._query(gc.SINFO) is None


def test_the_choice_is_recorded_in_the_rules_log_and_a_jsonl(tmp_path):
    choice = gc.Choice(4, "4 free on one node per sinfo")
    gc.record(choice, "train_sft", {}, 2, str(tmp_path), dryrun=False)
    history = (tmp_path / "logs" / ".train_sft.log.history").read_text()
    assert "train_sft attempt 2: 4 GPU(s): 4 free on one node per sinfo" in history
    entry = json.loads((tmp_path / "logs" / "gpu_choices.jsonl").read_text())
    assert (entry["rule"], entry["gpus"], entry["attempt"]) == ("train_sft", 4, 2)
    gc.record(choice, "train_sft", {}, 3, str(tmp_path / "dry"), dryrun=True)
    assert not (tmp_path / "dry").exists()


def test_a_profiles_count_that_cannot_keep_the_batch_is_refused_before_any_job(tmp_path):
    from wfhelpers import copy_workflow, snakemake

    work = copy_workflow(tmp_path / "wf")
    proc = snakemake(work, "results/models/sft", "-n", "--configfile", "config/demo.yaml", "--set-resources",
                     "train_sft:gpu_counts='8,3'", check=False, timeout=300)
    assert proc.returncode != 0
    assert "train_sft: 3 GPUs cannot keep the recipe's global_batch_size 8" in proc.stdout + proc.stderr
    assert "nearest valid counts: 2, 4" in proc.stdout + proc.stderr


def test_the_plan_shows_wall_and_gpu_hours_per_count():
    from test_plan import CFG, DPO, SFT

    from mamba_align.ops.reporting import plan

    p = plan.make_plan(CFG, SFT, DPO, {"train_sft": 8, "train_dpo": 8}, "A100-80GB", results="/nonexistent")
    sft = next(j for j in p["jobs"] if j["rule"] == "train_sft")
    rows = {r["gpus"]: r for r in sft["by_gpu_count"]}
    assert sorted(rows) == [1, 2, 4, 8]  # every count that divides the recipe's global batch
    assert rows[8]["hours"] == pytest.approx(sft["hours"], abs=0.01)
    eff = plan.MULTI_GPU_EFFICIENCY["sft"]
    assert rows[4]["hours"] == pytest.approx(2 * rows[8]["hours"], rel=0.01)  # the same per-GPU efficiency
    assert rows[1]["gpu_hours"] == pytest.approx(rows[8]["gpu_hours"] * eff, rel=0.01)  # no DDP overhead on 1
    text = plan.format_plan(p)
    assert "training on another GPU count" in text
    assert any(line.startswith("train_dpo") and line.rstrip().endswith("(planned)") and " 8 " in line
               for line in text.splitlines())


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS": "a100:2"}, 2),
    ({"SLURM_GPUS": "a100:4"}, 4),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({"_CONDOR_AssignedGPUs": "CUDA0,CUDA1"}, 2),
    ({}, None),
])
def test_inside_the_job_the_count_is_what_the_scheduler_gave(env, n):
    assert gc.granted_gpus(env) == n


def test_inside_an_htcondor_job_the_job_ad_says(tmp_path):
    ad = tmp_path / ".job.ad"
    ad.write_text('Cmd = "self_checkpoint.sh"\nRequestGpus = 4\nRequestCpus = 32\n')
    assert gc.granted_gpus({"_CONDOR_JOB_AD": str(ad)}) == 4
