# Two commands work on a fresh machine: `make demo` and `make test` (each runs `setup` first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# DeepSpeed's JIT-built CPU ops live with the venv (tests/launch.py uses the same folder), so setup builds
# them once for the demo and the tests alike, and another checkout's venv cannot invalidate them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo demo-sweep test test-fast lint bench-data cluster clean

setup: $(STAMP)

# torch goes in first: DeepSpeed ships only an sdist whose build imports torch, so the project is
# installed without build isolation (an isolated build would download a second torch).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -q "torch>=2.4,<2.16" "torchvision>=0.19,<0.30"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	# DeepSpeed JIT-compiles its CPU shared-memory collective on first use (~2 min, cached in
	# TORCH_EXTENSIONS_DIR above): do it here, once, not inside the first training run.
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null
	touch $(STAMP)

demo: setup
	$(PY) -m trainer.demo --out runs/demo

# Optional: top-1 against GMACs for both gates at rho 0.5-0.9 (reuses runs/demo's data and teacher; ~25 min).
demo-sweep: setup
	$(PY) -m trainer.demo.sweep --out runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist"

lint: setup
	$(VENV)/bin/ruff check .

# The local 2-node cluster (SLURM node1/node2, pdsh/ssh node-a/node-b) that tests/test_launch_paths.py uses.
cluster:
	bash tests/cluster/up.sh

bench-data: setup
	$(PY) -m trainer.bench data --img-size 384 --workers 1

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
