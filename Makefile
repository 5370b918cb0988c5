# Two set-up commands for a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs what it needs. TORCH pins the CPU build that lies
# on the development machines' disk; users with GPUs can pass their own, e.g.
#   make test TORCH="torch>=2.3 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench install install-nnunet clean

$(BIN)/swinssl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/swinssl

# The nnU-Net bridge's extra, keeping the venv's torch: unpinned, nnU-Net's dependencies (timm ->
# torchvision) would pull the newest torch, a CUDA build of several GB, over it.
install-nnunet: install
	$(BIN)/pip install -q -e ".[nnunet]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])')"

demo: install
	$(BIN)/swinssl demo --out runs/demo --fresh

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/network.py --json runs/bench/network.json

clean:
	rm -rf $(VENV) runs
