#!/usr/bin/env bash
# The nightly workflow rehearsed on this machine (`tox -e nightly`): the bench and report jobs run
# the same step scripts as .github/workflows/nightly.yml, with two shards of the matrix as two
# "machines" (HARNESS_HARDWARE_LABEL rehearsal-a and rehearsal-b) in this environment's stack,
# the artifact upload and download as copies, and the history as a local dir instead of a branch
# (fetch-history.sh and push-history.sh are the only steps left out). Each call is one night.
#
#   ci/nightly/rehearse.sh [--work DIR] [--matrix FILE] [--runs DIR] [--night NAME]
#     --work DIR     where nights, history and reports go (default reports/nightly-rehearsal)
#     --matrix FILE  matrix file (default: the workflow's, ci/nightly/matrix.toml)
#     --runs DIR     skip the bench steps: tonight's run dirs are the ones under DIR
#     --night NAME   this night's name (default: UTC time, YYYYMMDD-HHMMSS)
# Exit: the report step's status (1: a significant regression beyond the gate), else the first
# failing bench step's.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
work="reports/nightly-rehearsal"
runs=""
export NIGHTLY_MATRIX="${NIGHTLY_MATRIX:-ci/nightly/matrix.toml}"
export NIGHTLY_NIGHT="${NIGHTLY_NIGHT:-$(date -u +%Y%m%d-%H%M%S)}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --matrix) NIGHTLY_MATRIX="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --night) NIGHTLY_NIGHT="$2"; shift 2 ;;
    *) echo "rehearse.sh: unknown argument '$1'; see the comment at the top" >&2; exit 2 ;;
  esac
done
tonight="$work/nights/$NIGHTLY_NIGHT"
if [[ -e "$tonight" ]]; then
  echo "rehearse.sh: $tonight exists already; give another --night" >&2
  exit 2
fi
export NIGHTLY_HISTORY="${NIGHTLY_HISTORY:-$work/history}"
export NIGHTLY_ARTIFACTS="$tonight/artifacts"
export NIGHTLY_REPORT="$tonight/report"
mkdir -p "$NIGHTLY_ARTIFACTS" "$NIGHTLY_HISTORY"

bench_status=0
if [[ -n "$runs" ]]; then
  echo "== bench: tonight's run dirs from $runs"
  cp -r "$runs"/. "$NIGHTLY_ARTIFACTS"/
else
  for shard in 1 2; do
    label="rehearsal-$([[ $shard -eq 1 ]] && echo a || echo b)"
    run_id="$label-current-${shard}of2"
    echo "== bench: shard $shard/2 as machine $label"
    HARNESS_HARDWARE_LABEL="$label" NIGHTLY_STACK=current NIGHTLY_SHARD="$shard/2" NIGHTLY_RUN_ID="$run_id" \
      NIGHTLY_OUT="$tonight/bench" ci/nightly/bench.sh
    status=$?
    if [[ $bench_status -eq 0 ]]; then bench_status=$status; fi
    # upload-artifact (the run dir without reference outputs) + download-artifact (into a dir named after the artifact)
    if [[ -d "$tonight/bench/$run_id" ]]; then
      mkdir -p "$NIGHTLY_ARTIFACTS/run-$run_id"
      cp -r "$tonight/bench/$run_id"/. "$NIGHTLY_ARTIFACTS/run-$run_id"/
      rm -rf "$NIGHTLY_ARTIFACTS/run-$run_id/reference"
    fi
  done
fi
echo "== report"
ci/nightly/report.sh
report_status=$?
echo "== summary"
GITHUB_STEP_SUMMARY="$tonight/step-summary.md" ci/nightly/summary.sh
cat "$tonight/step-summary.md"
echo "== history"
ci/nightly/append-history.sh
if [[ $report_status -ne 0 ]]; then exit "$report_status"; fi
exit "$bench_status"
