#!/usr/bin/env bash
# Workflow step (bench job): one shard of the matrix on this machine, in one software stack.
#   NIGHTLY_STACK     stack name: runs in tox env stack-$NIGHTLY_STACK; "current" runs in this environment
#   NIGHTLY_SHARD     I/N
#   NIGHTLY_MATRIX    matrix file
#   NIGHTLY_OUT       reports dir; the run dir is $NIGHTLY_OUT/$NIGHTLY_RUN_ID
#   NIGHTLY_RUN_ID    run dir name, unique per label × stack × shard
#   HARNESS_HARDWARE_LABEL  this machine's label in ci/hardware.toml
#   PIP_EXTRA_INDEX_URL     the label's extra index, from the repository variable its pip-index-variable
#                           names (empty: pip's own configuration)
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${NIGHTLY_STACK:?}" "${NIGHTLY_SHARD:?}" "${NIGHTLY_MATRIX:?}" "${NIGHTLY_OUT:?}" "${NIGHTLY_RUN_ID:?}"
if [[ -z "${PIP_EXTRA_INDEX_URL:-}" ]]; then unset PIP_EXTRA_INDEX_URL; fi
if [[ "$NIGHTLY_STACK" == current ]]; then
  exec ci/nightly/suites.sh
fi
exec python -m tox -e "stack-$NIGHTLY_STACK"
