#!/usr/bin/env bash
# Workflow step (report job): merge every run dir under $NIGHTLY_ARTIFACTS, compare with the
# newest night of $NIGHTLY_HISTORY (the baseline), draw the trends, write report.md/.html/.csv
# and summary.md into $NIGHTLY_REPORT, and apply the gate.
# Exit: 1 when a significant regression is worse than $NIGHTLY_FAIL_ON_REGRESSION percent.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${NIGHTLY_ARTIFACTS:?}" "${NIGHTLY_HISTORY:?}" "${NIGHTLY_REPORT:?}"
args=(report "$NIGHTLY_ARTIFACTS" --history "$NIGHTLY_HISTORY" --out "$NIGHTLY_REPORT" --format "md,html,csv"
      --fail-on-regression "${NIGHTLY_FAIL_ON_REGRESSION:-10}" --prices "${NIGHTLY_PRICES:-ci/hardware.toml}")
exec harness "${args[@]}"
