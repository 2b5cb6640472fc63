# The README's two commands: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: install install-system demo test lint coverage bench stress man clean

install:
	@scripts/install.sh

# The system layout libvirt's swtpm_user (tss) runs sgxvtpm in (README "With
# libvirt"): as root, through sudo otherwise. ARGS: e.g. --prefix DIR.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
install-system: install
	$(SUDO) $(PY) -m sgxvtpm.endpoint.libvirt.system $(ARGS)

demo: install
	$(PY) -m sgxvtpm.cli demo

test: install lint coverage
	$(PY) -m pytest -q

# The relay's sans-IO core (mux/connection.py) is covered branch for branch by
# its state-machine and focused tests (a fixed hypothesis seed: the same cases
# every run).
coverage: install
	COVERAGE_FILE=.coverage.mux $(PY) -m coverage run --branch --source=sgxvtpm.mux.connection \
		-m pytest -q -p no:cacheprovider --hypothesis-seed=0 tests/unit/test_mux_connection.py
	COVERAGE_FILE=.coverage.mux $(PY) -m coverage report --fail-under=100 --show-missing

lint: install
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: install
	$(PY) -m sgxvtpm.cli bench

# The man page, generated from the command line's parser (not committed: it carries
# the day it was made).
MANPAGE ?= man/sgxvtpm.1
man: install
	@mkdir -p $(dir $(MANPAGE))
	.venv/bin/argparse-manpage --module sgxvtpm.cli --function build_parser --prog sgxvtpm \
		--project-name sgxvtpm --manual-title "sgxvtpm manual" \
		--description "vTPMs for VMs, with the manager and every instance in an enclave" \
		--output $(MANPAGE)

stress: install
	SGXVTPM_STRESS=1 $(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage*
