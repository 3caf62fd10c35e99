"""The environment locks (requirements/): a fresh machine installs exactly what the tests passed on.

`make setup` installs requirements/cpu.lock (hashes required, no resolution); the conda env and the container
install requirements/gpu.lock. What is not run here: resolving the locks (`make lock` needs the package index)
and installing the GPU lock (no CUDA build of torch on this machine)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"


def load_lock_module():
    spec = importlib.util.spec_from_file_location("lock", REQ / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = load_lock_module()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_blocks(text: str) -> dict[str, str]:
    """name -> the lines of its requirement (pin, hashes, notes)."""
    blocks, name = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = normalize(line.split("==")[0])
            blocks[name] = line
        elif name and line.startswith(" "):
            blocks[name] += "\n" + line
    return blocks


@pytest.mark.parametrize("stack", ["cpu", "gpu"])
def test_every_locked_package_is_pinned_with_hashes_and_torch_is_not_locked(stack):
    blocks = requirement_blocks((REQ / f"{stack}.lock").read_text())
    assert len(blocks) > 100
    for name, block in blocks.items():
        assert re.match(r"^[A-Za-z0-9_.-]+==\S+", block), block.splitlines()[0]
        assert "--hash=sha256:" in block, f"{stack}.lock: {name} has no hash"
    assert "torch" not in blocks and not any(LOCK.TORCH_LIBRARIES.match(n) for n in blocks)


@pytest.mark.parametrize("stack", ["cpu", "gpu"])
def test_every_dependency_of_the_project_is_locked(stack):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in LOCK.STACKS[stack]["extras"]:
        wanted += project["optional-dependencies"][extra]
    names = {normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in wanted}
    names.discard("torch")
    locked = LOCK.pins((REQ / f"{stack}.lock").read_text())
    missing = sorted(n for n in names if n not in {normalize(k) for k in locked})
    assert not missing, f"{stack}.lock lacks {missing}: run `make lock` after changing pyproject.toml"


def test_this_environment_is_the_lock():
    """The tests (and their canaries) run against the lock, not against whatever is newest today."""
    locked = LOCK.pins((REQ / "cpu.lock").read_text())
    wrong = {}
    for name, version in locked.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, (f"installed packages differ from requirements/cpu.lock (locked, installed): {wrong}; "
                       "`make setup` installs the lock")


def test_make_setup_installs_the_lock_with_hashes_and_resolves_nothing():
    text = (REPO / "Makefile").read_text()
    assert "LOCK ?= requirements/cpu.lock" in text
    assert "pip install -q --no-deps --require-hashes -r $(LOCK)" in text
    assert "pip install -q --no-deps --no-build-isolation -e ." in text
    # the project's install line never resolves (a bare `pip install -e '.[...]'` would take today's releases)
    assert not re.search(r"pip install[^\n]*-e '\.\[", text)
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_conda_env_and_container_install_the_gpu_lock():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "mamba-align.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = LOCK.pins("\n".join(pip))
    assert env["dependencies"][0] == f"python={LOCK.STACKS['gpu']['python']}"
    assert conda.pop("torch") == "2.11.0"
    assert conda == LOCK.pins((REQ / "gpu.lock").read_text()), "`make lock` writes the conda env's pins"
    text = (REPO / "workflow" / "envs" / "mamba-align.def").read_text()
    assert "requirements/gpu.lock /opt/gpu.lock" in text
    assert "pip install --no-cache-dir --no-deps --require-hashes -r /opt/gpu.lock" in text
    assert "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130" in text
    assert "python3.12 -m venv" in text


def test_requires_python_is_what_the_code_and_the_locks_need():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # hashlib.file_digest (utils.sha256_file), tomllib
    assert min(s["python"] for s in LOCK.STACKS.values()) == "3.11"


def test_drop_packages_removes_whole_blocks():
    lines = ["a==1 \\", "    --hash=sha256:aa", "    # via torch", "nvidia-x==2 ; sys_platform == 'linux' \\",
             "    --hash=sha256:bb", "    # via torch", "triton==3 \\", "    --hash=sha256:cc", "b==4 \\",
             "    --hash=sha256:dd", "# installed without its own dependencies:", "c==5 \\", "    --hash=sha256:ee"]
    kept = LOCK._drop_packages(lines, LOCK.TORCH_LIBRARIES)
    assert [k.split()[0] for k in kept if not k.startswith(" ")] == ["a==1", "b==4", "#", "c==5"]
    assert "--hash=sha256:bb" not in "\n".join(kept) and "--hash=sha256:cc" not in "\n".join(kept)


def test_models_never_load_kernels_from_the_hub(tmp_path):
    """transformers 5.25 kernelizes models with code downloaded from the Hub by default; the lock decides what runs."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "USE_HUB_KERNELS"}
    code = ("import mamba_align, torch; from transformers import MambaConfig, MambaForCausalLM; "
            "from transformers.integrations.hub_kernels import _kernels_enabled; "
            "MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32)).save_pretrained(%r); "
            "m = MambaForCausalLM.from_pretrained(%r); m.train(); print(_kernels_enabled(), m.use_kernels)"
            % (str(tmp_path), str(tmp_path)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import mamba_align, os; print(os.environ['USE_HUB_KERNELS'])"],
                       env=dict(env, USE_HUB_KERNELS="YES"), capture_output=True, text=True)
    assert r.stdout.strip() == "YES"  # an explicit choice of the user's stays
