# Two commands on a fresh machine:  make demo  (sidecar + tiny trainer, wandb offline)
#                                   make test  (the whole suite, real processes)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Wall-clock budget for the whole suite (CI allows 90 min; it takes a few).
TEST_BUDGET ?= 1500

.PHONY: install demo test bench gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml tests/constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch resolves to the newest CUDA build (gigabytes)
	$(PY) -m pip install -q torch==2.13.0
	# the frameworks (test extra) under the same torch pin: -c keeps them from upgrading it
	$(PY) -m pip install -q -c tests/constraints.txt -e '.[sidecar,demo,test,frameworks]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	timeout -k 30 $(TEST_BUDGET) $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/log_latency.py
	$(PY) bench/log_latency_faults.py

# For a CUDA machine without a package index: the wheels bench/gpu_check.sh installs there
gpu-wheels: $(STAMP)
	bench/gpu_wheels.sh .whl

clean:
	rm -rf $(VENV) demo-out bench-out *.egg-info
