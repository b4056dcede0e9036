#!/usr/bin/env bash
# The test command (README and .ci/run): install what is needed, lint, type-check, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
# tests/test_report_browser.py renders the HTML report in headless Chromium: Debian's
# chromium-headless-shell, installed here once when no Chromium is present (measured: 96 MB
# download, 224 MB installed, 26 s). Without root or apt-get the test skips and says why.
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium-headless-shell; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium-headless-shell; the browser test skips" >&2
fi
.venv/bin/ruff check tune_sana trials tests bench
.venv/bin/mypy tune_sana trials
export TUNE_SANA_HOME=${TUNE_SANA_HOME:-$PWD/.cache/tune-sana-test}
# Two pytest workers, each taking whole test files (their module-scoped Ray stays one per file):
# the suite waits on process start-ups and Ray more than it computes, so two at once took
# 19.6 min here against 28-40 min one at a time. TUNE_SANA_TEST_WORKERS=0 runs it serially.
workers=${TUNE_SANA_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  .venv/bin/pytest -q "$@"
else
  .venv/bin/pytest -q -n "$workers" --dist loadfile "$@"
fi
