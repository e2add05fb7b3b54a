#!/usr/bin/env bash
# Workflow step (report job): tonight's run dirs (records and environment only) into
# $NIGHTLY_HISTORY/$NIGHTLY_NIGHT; nights beyond the newest $NIGHTLY_KEEP_NIGHTS are dropped.
set -euo pipefail
: "${NIGHTLY_ARTIFACTS:?}" "${NIGHTLY_HISTORY:?}"
night="${NIGHTLY_NIGHT:-$(date -u +%Y%m%d-%H%M%S)}"
keep="${NIGHTLY_KEEP_NIGHTS:-60}"
dest="$NIGHTLY_HISTORY/$night"
count=0
while IFS= read -r -d '' results; do
  run_dir="$(dirname "$results")"
  target="$dest/$(basename "$run_dir")"
  mkdir -p "$target"
  cp "$results" "$target/"
  for extra in environment.json command.json; do
    if [[ -f "$run_dir/$extra" ]]; then cp "$run_dir/$extra" "$target/"; fi
  done
  count=$((count + 1))
done < <(find "$NIGHTLY_ARTIFACTS" -name results.jsonl -print0 | sort -z)
echo "history: $count run dirs -> $dest"
mapfile -t nights < <(find "$NIGHTLY_HISTORY" -mindepth 1 -maxdepth 1 -type d | sort)
for ((i = 0; i < ${#nights[@]} - keep; i++)); do
  rm -rf "${nights[$i]}"
done
