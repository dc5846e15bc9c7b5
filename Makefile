# Development entry points. `make demo` and `make test` are the README's quick start.
#
# The virtual environment installs torch through constraints/cpu.txt so a CPU machine
# gets the CPU wheel; on a GPU machine pass TORCH_CONSTRAINTS=/dev/null (or your own
# pin) to keep the CUDA build you already have.
PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.zeroplan-installed
PYTEST_ARGS ?=

# The other vector unit for `make test-capability`: AVX2 where the CPU has AVX-512, else
# ATen's scalar kernels. ATEN_CPU_CAPABILITY moves ATen's own kernels (the elementwise ops,
# reductions, softmax and norms a forward and backward are made of).
CAPABILITY ?= $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo avx2 || echo default)

.PHONY: setup browser postgres slurm demo test test-capability clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(TORCH_CONSTRAINTS) -e '.[dev]'
	touch $@

# Chromium, for the test that opens the tuner's report.html in a headless browser
# (tests/autotune/test_report_browser.py): a Debian package, not a pip one. Installed with
# apt-get where there is one (through sudo unless root); elsewhere that test skips saying why,
# except under .ci/run, where a missing browser fails it.
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	if command -v apt-get >/dev/null; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "no apt-get here: install Chromium (or set CHROMIUM) for the report.html browser test"; fi

# PostgreSQL, for the test of tuner workers sharing one study on a server
# (tests/autotune/test_workers.py starts a throw-away server from its initdb and pg_ctl): Debian's
# `postgresql` package, installed as Chromium is; elsewhere that test skips saying why, except
# under .ci/run, where a missing server fails it.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0; \
	if command -v apt-get >/dev/null; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else echo "no apt-get here: install PostgreSQL (or set PG_BIN) for the tuner workers' test"; fi

# Slurm, for the test that runs `sbatch --test-only` on the emitted launch.sbatch against a
# throw-away two-node cluster of this machine's own daemons (tests/compiler/slurm_cluster.py):
# Debian's `slurm-wlm` package, without its recommends (no munge key is needed: the test's
# cluster uses auth/none). Elsewhere, or not as root, that test skips saying why, except under
# .ci/run, where a missing Slurm fails it.
slurm:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && exit 0; \
	if command -v apt-get >/dev/null; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm; \
	else echo "no apt-get here: install Slurm (slurmctld, slurmd, sbatch) for the launch.sbatch test"; fi

demo: setup
	$(BIN)/zeroplan validate examples/hf_zero2.json --world-size 2 > /dev/null
	$(BIN)/zeroplan autotune examples/autotune_tiny.yaml --model tiny --nproc-per-node 2 --out out/tuned
	$(BIN)/zeroplan train out/tuned/best_plan.json --model tiny --steps 30 --metrics out/tuned/train.jsonl
	@echo "tuned plan, trials.csv and report.md in out/tuned/"

test: setup browser postgres slurm
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The tests that compare floating-point results (marker `numerics`) once more, with ATen's
# kernels on another vector unit than this CPU's best, so one machine checks that they do not
# depend on which one the CPU has. CI runs it after `make test`.
test-capability: setup
	ATEN_CPU_CAPABILITY=$(CAPABILITY) $(BIN)/python -m pytest -q -m numerics $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
