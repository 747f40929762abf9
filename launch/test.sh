#!/usr/bin/env bash
# The README's second command: set up (once), then run the whole test suite, multi-rank
# horovodrun tests included. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$DISTFT_ROOT/launch/install.sh"
cd "$DISTFT_ROOT"
exec python -m pytest "$@"
