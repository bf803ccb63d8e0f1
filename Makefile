# Every target works on a fresh machine: it makes .venv and installs from this repo's files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
EXTRAS ?= dev,demo,docs

.PHONY: help install browser test test-fast lint typecheck demo bench docs docs-serve soak mutate clean

help:
	@echo "make demo   serve the demo API at http://127.0.0.1:8000 (all protections on)"
	@echo "make test   lint, type-check and run the whole test suite (needs Redis at 127.0.0.1:6379)"
	@echo "make lint | bench | docs | soak | mutate | clean"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "asgi_armor needs Python >= 3.11 (set PYTHON=python3.12 ...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

MUTATE_STAMP := $(VENV)/.installed-mutate
# The core modules, one mutmut run each (docs/mutation.md).
MUTATE_MODULES := asgi_armor.ratelimit.bucket asgi_armor.ratelimit.limiter asgi_armor.breaker \
	asgi_armor.signing asgi_armor.idempotency

$(MUTATE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),mutate]'
	touch $(MUTATE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check asgi_armor tests benchmarks
	$(BIN)/ruff format --check asgi_armor tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict asgi_armor tests/typing_usage.py

# The dashboard test drives Debian's chromium over the DevTools protocol (no browser
# download); installed here when missing, and required: a missing browser fails the test.
browser:
	@command -v chromium >/dev/null || { echo "test: installing chromium (the dashboard test's browser)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get install -y chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y chromium >/dev/null; }; } || \
		echo "test: chromium could not be installed; the dashboard test will fail"

test: lint typecheck browser
	ARMOR_REQUIRE_REDIS=1 ARMOR_REQUIRE_DOCS=1 ARMOR_REQUIRE_BROWSER=1 \
		$(BIN)/python -m pytest -m "not slow" -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -x

soak: $(STAMP)
	ARMOR_REQUIRE_REDIS=1 $(BIN)/python -m pytest -m slow -q

# Mutation testing, not part of `make test`: each mutant against the tests that reach it,
# module by module, at the lowest CPU priority. Resumes where it stopped (rm -rf mutants
# to start over); prints the per-module table and the survivors.
mutate: $(MUTATE_STAMP)
	@for module in $(MUTATE_MODULES); do \
		echo "== $$module"; \
		ARMOR_REQUIRE_REDIS=1 nice -n 19 $(BIN)/mutmut run --max-children 2 "$$module.*" \
			> mutants-$$module.log 2>&1 || { tail -20 mutants-$$module.log; exit 1; }; \
	done
	$(BIN)/mutmut results --all true | $(BIN)/python tests/mutation_report.py

demo: $(STAMP)
	$(BIN)/asgi-armor demo

bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "bench: installing wrk (the served runs' load generator)"; \
		apt-get install -y wrk >/dev/null 2>&1 || sudo apt-get install -y wrk >/dev/null 2>&1 || \
		echo "bench: wrk not installed; the served runs use benchmarks/loadgen.py"; }
	$(BIN)/python benchmarks/run.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants mutants-*.log
