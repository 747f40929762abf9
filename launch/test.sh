#!/usr/bin/env bash
# The README's second command: set up (once), then run the whole test suite, multi-rank
# horovodrun tests included. Extra arguments go to pytest.
#
# The GPU install (DISTFT_EXTRA=cu112 into .venv-cu112: mxnet-cu112, the CUDA libraries, Horovod
# built with NCCL) takes minutes with cold caches: for a whole-suite run it is built in the
# background, at the lowest CPU and I/O priority, while the other tests run;
# tests/install/test_gpu_install.py runs last and waits for it. A run that selects tests (a path, -k, -m)
# leaves the install to that test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$DISTFT_ROOT/launch/install.sh"
cd "$DISTFT_ROOT"
selects=0
for arg in "$@"; do case "$arg" in -*) ;; *) selects=1 ;; esac; done
if [ "$selects" = 0 ] && [ -z "${DISTFT_CU112_INSTALL_RC:-}" ]; then
  export DISTFT_CU112_VENV=${DISTFT_CU112_VENV:-$DISTFT_ROOT/.venv-cu112}
  export DISTFT_CU112_INSTALL_LOG=$DISTFT_CU112_VENV.install.log DISTFT_CU112_INSTALL_RC=$DISTFT_CU112_VENV.install.rc
  rm -f "$DISTFT_CU112_INSTALL_RC"
  (
    start=$(date +%s)
    rc=0
    idle=(nice -n 19); command -v ionice >/dev/null && idle+=(ionice -c 3)
    "${idle[@]}" env DISTFT_EXTRA=cu112 DISTFT_DEV=0 DISTFT_VENV="$DISTFT_CU112_VENV" \
      bash "$DISTFT_ROOT/launch/install.sh" > "$DISTFT_CU112_INSTALL_LOG" 2>&1 || rc=$?
    echo "[test.sh] cu112 install: exit $rc after $(( $(date +%s) - start )) s" >> "$DISTFT_CU112_INSTALL_LOG"
    echo "$rc" > "$DISTFT_CU112_INSTALL_RC.tmp" && mv "$DISTFT_CU112_INSTALL_RC.tmp" "$DISTFT_CU112_INSTALL_RC"
  ) </dev/null &
fi
python -m pytest "$@"
