#!/usr/bin/env bash
# The project's test command: set up (idempotent), then run the default test tier.
#
#   bash scripts/test.sh            # default tier (everything not marked slow)
#   bash scripts/test.sh --all      # also the slow tests
#   bash scripts/test.sh -k canny   # any other argument goes to pytest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/setup.sh

# The demo's browser test drives Debian's Chromium. Install it when we can (root with apt, as
# in CI); otherwise that one test is skipped and says why.
if [[ ! -x /usr/bin/chromium ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "[test] installing Debian's chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "[test] could not install chromium; the browser test will be skipped"
fi

args=()
for a in "$@"; do
  if [[ "$a" == "--all" ]]; then args+=(-m "slow or not slow"); else args+=("$a"); fi
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The toy models are tiny: one thread per process is faster than a pool that fights the
# 2-process (gloo) tests for the cores, and keeps pixel-exact comparisons reproducible.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
.venv/bin/python -m pytest "${args[@]}"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit $rc
