#!/usr/bin/env bash
# The test command (README and .ci/run): install what is needed, lint, type-check, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/ruff check tune_sana trials tests bench
.venv/bin/mypy tune_sana trials
export TUNE_SANA_HOME=${TUNE_SANA_HOME:-$PWD/.cache/tune-sana-test}
.venv/bin/pytest -q "$@"
