#!/usr/bin/env bash
# The main job: a demo sweep on the embedded defaults (local Ray, tiny Sana, built-in data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/tune-sana sweep "$@"
