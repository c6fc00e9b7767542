#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole workflow offline on an embedded tiny model: `littune demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/littune demo "$@"
