#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -n auto: one pytest-xdist worker per core (at most 4), whole test files to a worker (--dist loadfile: a module's
# fixtures are built once); tests/conftest.py gives each worker its share of the cores.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
