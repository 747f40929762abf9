#!/usr/bin/env bash
# One command for a machine with GPUs: the GPU install (DISTFT_EXTRA=cu112, into .venv-cu112),
# `distft doctor`, the GPU tests (tests/gpu/test_gpu.py: cuDNN BatchNorm, 1 GPU vs CPU, fp16 AMP,
# 2 ranks over NCCL), then `distft bench`; everything lands in one JSON. NOT YET RUN ON A GPU.
#
#   bash launch/gpu-smoke.sh [OUT.json]       (default: ./gpu-smoke.json)
#
# When the doctor says a GPU here cannot run the installed MXNet (a Hopper GPU: no sm_90 kernel in
# the mxnet-cu112 wheel), its one line is the result: the tests and the bench are not run; so too
# when no GPU is visible. Exit 0 when the doctor, every test and the bench passed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${1:-gpu-smoke.json}")
export DISTFT_VENV=${DISTFT_VENV:-$ROOT/.venv-cu112}
DISTFT_EXTRA=cu112 DISTFT_DEV=0 DISTFT_TEST=1 bash "$ROOT/launch/install.sh"
source "$ROOT/launch/env.sh"
cd "$ROOT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n[gpu-smoke] %s\n' "$*" >&2; }
doctor_rc=0 tests_rc=skipped bench_rc=skipped reason=
step "distft doctor"
python -m distft doctor --json "$work/doctor.json" || doctor_rc=$?
gpus=$(python -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["gpus"]))' "$work/doctor.json")
if [ "$doctor_rc" != 0 ]; then
  reason="the doctor says distft cannot run here (its line above); no test or bench was run"
elif [ "$gpus" = 0 ]; then
  reason="no GPU is visible here (see the doctor's driver line): nothing to smoke-test"
else
  step "GPU tests (pytest -m gpu tests/gpu/test_gpu.py) on $gpus GPU(s)"
  tests_rc=0
  python -m pytest -m gpu tests/gpu/test_gpu.py -q -rs --junitxml "$work/tests.xml" || tests_rc=$?
  np_=$(( gpus >= 2 ? 2 : 1 ))
  step "distft bench --np $np_ (configs/bench-resnet50.yaml)"
  bench_rc=0
  python -m distft bench --config configs/bench-resnet50.yaml --np "$np_" --steps 30 --window 5 \
    --cache-epochs 0 --json "$work/bench.json" || bench_rc=$?
fi

[ -n "$reason" ] && step "$reason"
python - "$work" "$OUT" "$doctor_rc" "$tests_rc" "$bench_rc" "$reason" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

work, out, doctor_rc, tests_rc, bench_rc, reason = sys.argv[1:]


def load(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None


tests = None
if os.path.exists(os.path.join(work, "tests.xml")):
    tests = []
    for case in ET.parse(os.path.join(work, "tests.xml")).iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = kind, node.get("message")
        tests.append({"name": case.get("name"), "outcome": outcome, "message": message,
                      "seconds": float(case.get("time", 0))})
result = {"reason": reason or None, "doctor": load("doctor.json"), "doctor_exit": int(doctor_rc),
          "tests": tests, "tests_exit": None if tests_rc == "skipped" else int(tests_rc),
          "bench": load("bench.json"), "bench_exit": None if bench_rc == "skipped" else int(bench_rc)}
result["ok"] = result["doctor_exit"] == 0 and result["tests_exit"] == 0 and result["bench_exit"] == 0
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
print(f"[gpu-smoke] wrote {out}: " + ("ok" if result["ok"] else "NOT ok"), file=sys.stderr)
sys.exit(0 if result["ok"] else 1)
EOF
