#!/usr/bin/env bash
# The README's pictures, taken by the browser tests (tests/test_viewer.py) on a copy of a real
# atlas: scripts/readme_screenshots.sh ATLAS_HOME  ->  docs/screenshots/{map,review,queue}.png
set -euo pipefail
cd "$(dirname "$0")/.."
home=${1:?usage: scripts/readme_screenshots.sh ATLAS_HOME (a built atlas, e.g. of ../shared/data/pbc)}
mkdir -p docs/screenshots
CELLATLAS_VIEWER_ATLAS="$(cd "$home" && pwd)" CELLATLAS_SHOTS=docs/screenshots \
  .venv/bin/python -m pytest -q tests/test_viewer.py -k "map_node_gallery or review_queue_walks"
ls -l docs/screenshots
