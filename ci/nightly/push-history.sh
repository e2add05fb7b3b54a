#!/usr/bin/env bash
# Workflow step (report job, scheduled and dispatched runs only): $NIGHTLY_HISTORY becomes the one
# commit of the history branch (force-pushed: the branch stays the size of the kept nights).
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${NIGHTLY_HISTORY:?}"
branch="${NIGHTLY_HISTORY_BRANCH:-nightly-history}"
index="$(mktemp -u)"
trap 'rm -f "$index"' EXIT
GIT_INDEX_FILE="$index" git --work-tree="$NIGHTLY_HISTORY" add --all --force .
tree="$(GIT_INDEX_FILE="$index" git write-tree)"
commit="$(GIT_AUTHOR_NAME="harness nightly" GIT_AUTHOR_EMAIL="nightly@users.noreply.github.com" \
  GIT_COMMITTER_NAME="harness nightly" GIT_COMMITTER_EMAIL="nightly@users.noreply.github.com" \
  git commit-tree "$tree" -m "nightly history up to ${NIGHTLY_NIGHT:-now}")"
git push --force --quiet origin "$commit:refs/heads/$branch"
echo "history: pushed $(find "$NIGHTLY_HISTORY" -mindepth 1 -maxdepth 1 -type d | wc -l) nights to $branch"
