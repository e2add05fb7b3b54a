#!/usr/bin/env bash
# Workflow step (report job): the earlier nights, from the history branch, into $NIGHTLY_HISTORY.
# The branch holds one commit: a dir per night (see append-history.sh). No branch yet: an empty
# history, and tonight is the first night.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${NIGHTLY_HISTORY:?}"
branch="${NIGHTLY_HISTORY_BRANCH:-nightly-history}"
mkdir -p "$NIGHTLY_HISTORY"
if git fetch --quiet --depth=1 origin "$branch" 2>/dev/null; then
  git archive FETCH_HEAD | tar -x -C "$NIGHTLY_HISTORY"
  echo "history: $(find "$NIGHTLY_HISTORY" -mindepth 1 -maxdepth 1 -type d | wc -l) nights from branch $branch"
else
  echo "history: no branch $branch yet; tonight is the first night"
fi
