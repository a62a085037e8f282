# Entry points for people and CI: `make test` on a fresh Debian 12 host installs what it needs, then tests.
.PHONY: setup test demo

PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	.venv/bin/hapki lab demo
