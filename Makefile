# The README's two commands: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: install demo test lint bench stress clean

install:
	@scripts/install.sh

demo: install
	$(PY) -m sgxvtpm.cli demo

test: install lint
	$(PY) -m pytest -q

lint: install
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: install
	$(PY) -m sgxvtpm.cli bench

stress: install
	SGXVTPM_STRESS=1 $(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
