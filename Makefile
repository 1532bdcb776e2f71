# Two commands on a fresh machine:  make demo  (sidecar + tiny trainer, wandb offline)
#                                   make test  (lint, the whole suite, the oldest wandb: what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Wall-clock budget for the whole suite (CI allows 90 min; it takes a few).
TEST_BUDGET ?= 1500
# The other end of the tested wandb range (pyproject.toml: wandb>=0.27.0,<0.32); `make suite`
# gets the newest allowed. The wandb-facing tests run again in a venv with this one.
WANDB_MIN   ?= 0.27.0
MIN_VENV    ?= .venv-wandb-min
MIN_STAMP   := $(MIN_VENV)/.installed-$(WANDB_MIN)
WANDB_TESTS := tests/test_e2e.py tests/test_transaction_log.py tests/test_wandb_failures.py

.PHONY: install demo test suite lint test-wandb-min bench gpu-wheels clean

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

# What .ci/run runs, in this order: lint, the whole suite (newest wandb), the oldest wandb
test: lint suite test-wandb-min

suite: $(STAMP)
	timeout -k 30 $(TEST_BUDGET) $(PY) -m pytest -q -p no:cacheprovider

# ruff (from the test extra; its configuration is in pyproject.toml)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# No torch here: the wandb-facing tests do not need it. They read records back with the
# newest wandb's `wandb leet inspect` (from $(VENV)), which older releases do not have.
$(MIN_STAMP): pyproject.toml
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q -e '.[sidecar]' 'wandb==$(WANDB_MIN)' 'pytest>=8' 'pytest-timeout>=2.3'
	$(MIN_VENV)/bin/python -c "import wandb; assert wandb.__version__ == '$(WANDB_MIN)', wandb.__version__"
	touch $@

test-wandb-min: $(STAMP) $(MIN_STAMP)
	KFORGE_TEST_WANDB_CLI=$(CURDIR)/$(VENV)/bin/wandb timeout -k 30 $(TEST_BUDGET) \
		$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(WANDB_TESTS)

# Every figure beside its reference from the same run; bench/report.py prints the one table
# (bench-out/report.md) that the README's figures come from.
BENCHES = client_speed receiver_cpu sidecar_rss uploader_drain
bench: $(STAMP)
	rm -f bench-out/*.json
	$(PY) bench/log_latency.py
	$(PY) bench/log_latency_faults.py
	for b in $(BENCHES); do $(PY) bench/$$b.py || exit 1; done
	$(PY) bench/report.py

# For a CUDA machine without a package index: the wheels bench/gpu_check.sh installs there
gpu-wheels: $(STAMP)
	bench/gpu_wheels.sh .whl

clean:
	rm -rf $(VENV) $(MIN_VENV) demo-out bench-out *.egg-info
