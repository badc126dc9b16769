#!/usr/bin/env bash
# Set up (contrib/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/ruff check snapfs tests bench contrib
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
