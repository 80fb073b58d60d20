# The README's commands. Each target creates .venv when it is missing (and does nothing
# more when it is there), installs everything, then runs.
#   make train ARGS="model=dcn trainer.steps=200"    # Hydra overrides go in ARGS
#   make test
#   make setup ACCEL=cuda                             # a venv for GPU nodes, built anywhere

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
NPROC ?= 2

# Which torch and fbgemm the venv gets:
#   cuda  fbgemm-gpu and a CUDA build of torch (on Linux x86_64, PyPI's torch 2.13.0 and
#         fbgemm-gpu 1.8.0 are both CUDA 13.0 builds);
#   cpu   fbgemm-gpu-cpu (torch from the same index; a CPU-only cluster can name PyTorch's
#         CPU index in TORCH_INDEX_URL to skip the CUDA download);
#   auto  what this venv was built for (recorded in .venv/.accel), else cuda where nvidia-smi
#         exists and cpu elsewhere. A login node has no nvidia-smi: build a venv for GPU
#         nodes there with ACCEL=cuda; later auto runs (make test, make train) keep it.
# Asking for the other one reinstalls torch and fbgemm.
ACCEL ?= auto
# An index to take torch and fbgemm-gpu from, e.g. PyTorch's own wheel index for the CUDA
# version of an older driver (its path ends in whl/cu126 for CUDA 12.6); empty = pip's configured index.
TORCH_INDEX_URL ?=

ACCEL_FILE := $(VENV)/.accel
RECORDED_ACCEL := $(filter cuda cpu,$(shell cat $(ACCEL_FILE) 2>/dev/null))
PROBED_ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
CHOSEN_ACCEL := $(if $(filter auto,$(ACCEL)),$(or $(RECORDED_ACCEL),$(PROBED_ACCEL)),$(ACCEL))
ifeq ($(filter cuda cpu,$(CHOSEN_ACCEL)),)
$(error ACCEL=$(ACCEL) is not one of auto, cuda, cpu)
endif
FBGEMM_cuda := fbgemm-gpu
FBGEMM_cpu := fbgemm-gpu-cpu
FBGEMM := $(FBGEMM_$(CHOSEN_ACCEL))
OTHER_FBGEMM := $(FBGEMM_$(filter-out $(CHOSEN_ACCEL),cuda cpu))
INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
# One stamp per accelerator: asking for the other one makes this target out of date.
INSTALLED := $(VENV)/.installed-$(CHOSEN_ACCEL)

.PHONY: setup train train-2 test bench gpu-check clean

setup: $(INSTALLED)

# The choice is recorded first, so that an install cut short is tried again the same way.
# A venv built for the other accelerator then loses its torch and fbgemm: pip would keep an
# installed 2.13.0+cpu for "torch==2.13.0", and both fbgemm packages write fbgemm_gpu/.
# torchrec's metadata asks for the CUDA fbgemm-gpu: it is installed without its deps.
# install_check then verifies what pip really installed (a CPU torch for ACCEL=cuda fails).
$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed $(VENV)/.installed-cuda $(VENV)/.installed-cpu
	echo $(CHOSEN_ACCEL) > $(ACCEL_FILE)
	if $(PY) -m pip show --quiet $(OTHER_FBGEMM) >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall --quiet -y torch $(OTHER_FBGEMM); fi
	$(PY) -m pip install --quiet $(INDEX) torch==2.13.0 $(FBGEMM)==1.8.0
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m train.install_check --expect $(CHOSEN_ACCEL)
	touch $@

train: setup
	$(PY) -m train $(ARGS)

# The same job on NPROC local ranks.
train-2: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m train $(ARGS)

test: setup
	$(PY) -m pytest -q tests

# The GPU and cluster path on this machine's GPU (install, sharding, hashing, bf16, host
# syncs, checkpoints, speed against TorchRec): one table, a few minutes.
gpu-check: setup
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) outputs multirun
