#!/usr/bin/env bash
# Inside a stack's environment (tox stack-*, or this one): the pytest suites on one shard, with
# JUnit XML and pytest-benchmark JSON beside the harness records in the run dir.
# Exit: pytest's status (1 when a combination failed or broke a budget); an empty shard is 0.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export HARNESS_STACK="${HARNESS_STACK:-$NIGHTLY_STACK}"
run_dir="$NIGHTLY_OUT/$NIGHTLY_RUN_ID"
mkdir -p "$run_dir"
python -m pytest suites/ --benchmark --matrix "$NIGHTLY_MATRIX" --shard "$NIGHTLY_SHARD" \
  --reports-dir "$NIGHTLY_OUT" --run-id "$NIGHTLY_RUN_ID" \
  --junitxml "$run_dir/junit.xml" --benchmark-json "$run_dir/benchmark.json" \
  -p no:cacheprovider -q -rfE
status=$?
if [[ $status -eq 5 ]]; then  # no tests collected: this shard is empty
  echo "suites.sh: shard $NIGHTLY_SHARD has no combinations"
  status=0
fi
exit "$status"
