# One-command set-up on a fresh machine: every target creates/updates the virtual environment itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The lower bounds of requirements.txt that `make test-min-deps` tests (CI: .ci/run). torch is shared with the
# main venv, so its bound is the version CI installs.
MIN_DEPS ?= transformers==5.25.0 datasets==3.0.0
VENV_MIN ?= .venv-min
JOBS ?= 2

.PHONY: venv build test check test-fast demo bench bench-quick bench-check bench-gate bench-save report test-min-deps info clean

$(BIN)/.deps-stamp: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(BIN)/.deps-stamp

# Builds minitron._C in place (CPU kernels; CUDA kernels too when torch has CUDA or FORCE_CUDA=1).
build: venv
	MAX_JOBS=$(JOBS) $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .

info: build
	$(BIN)/python -m minitron.info

test: build
	$(BIN)/python -m minitron.info
	$(BIN)/python -m pytest tests -q -ra

# What CI runs: the tests, then the CPU regression gate. Writes nothing tracked (results go to .bench-out/).
check: test bench-check

# The driver tests (the code that uses transformers/datasets) with the lowest versions requirements.txt allows:
# a second venv that sees the main venv's packages (torch, the built extension) through a .pth file and
# shadows them with the minimum versions.
test-min-deps: build
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(BIN)/python -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > \
		"$$($(VENV_MIN)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-main-venv.pth"
	$(VENV_MIN)/bin/python -m pip install -q $(MIN_DEPS)
	$(VENV_MIN)/bin/python -m pytest tests/driver -q -p no:cacheprovider

test-fast: build
	$(BIN)/python -m pytest tests -q -x -m "not slow"

demo: build
	$(BIN)/minitron demo

# Benchmark runs write to the untracked .bench-out/results/; bench-save appends to the committed
# benchmarks/results/ (refused on a dirty tree) and `make report` regenerates the README/docs tables from it.
bench: build
	$(BIN)/python -m benchmarks

bench-quick: build
	$(BIN)/python -m benchmarks --quick

bench-save: build
	$(BIN)/python -m benchmarks --save

report: venv
	$(BIN)/python -m benchmarks.report

# The CPU regression gate: instructions per op call under valgrind (deterministic, +3%) ...
bench-gate: build
	$(BIN)/python -m benchmarks.instructions --compare benchmarks/baselines/cpu-instructions.jsonl

# ... plus the quick wall-clock run: peak memory and failures gated, time ratios reported for information
# (they spread 1.2-2.2x between idle runs on a shared 2-core VM).
bench-check: bench-gate
	$(BIN)/python -m benchmarks --quick --compare benchmarks/baselines/cpu.jsonl --time-informational \
		--tolerance 1.0 --memory-tolerance 0.25

clean:
	rm -rf build *.egg-info minitron/_C*.so
