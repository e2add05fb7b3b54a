#!/usr/bin/env bash
# Workflow step: install what the next steps need.
#   install.sh bench   tox (each stack env installs its own pins, tox.ini stack-*)
#   install.sh report  the harness with its report extra: merging and reporting need no torch
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 2
case "${1:-bench}" in
  bench) python -m pip install --quiet "tox>=4" ;;
  report) python -m pip install --quiet -e ".[report]" ;;
  *) echo "install.sh: unknown target '$1': use bench or report" >&2; exit 2 ;;
esac
