#!/usr/bin/env bash
# Workflow step (report job): the morning summary, only what changed, on the run's page
# ($GITHUB_STEP_SUMMARY), or on stdout where that is unset.
set -euo pipefail
: "${NIGHTLY_REPORT:?}"
summary="$NIGHTLY_REPORT/summary.md"
if [[ ! -f "$summary" ]]; then
  text="## What changed"$'\n\n'"No summary: the report step did not finish; see its log."
else
  text="$(cat "$summary")"
fi
if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
  printf '%s\n' "$text" >>"$GITHUB_STEP_SUMMARY"
else
  printf '%s\n' "$text"
fi
