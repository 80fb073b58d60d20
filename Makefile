# The README's commands. Each target creates .venv when it is missing (and does nothing
# more when it is there), installs everything, then runs.
#   make train ARGS="model=dcn trainer.steps=200"    # Hydra overrides go in ARGS
#   make test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# fbgemm-gpu (CUDA) where an NVIDIA driver is present, the CPU build elsewhere.
FBGEMM := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo fbgemm-gpu==1.8.0 || echo fbgemm-gpu-cpu==1.8.0)
ARGS ?=
NPROC ?= 2

.PHONY: setup train train-2 test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 $(FBGEMM)
	# torchrec's metadata asks for the CUDA fbgemm-gpu: install it without its deps.
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: setup
	$(PY) -m train $(ARGS)

# The same job on NPROC local ranks.
train-2: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m train $(ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs multirun
