#!/usr/bin/env bash
# The README's first command: set up (once), make the demo's pretrained backbone (once), then
# fine-tune a new head on 2 ranks with horovodrun. Extra arguments go to distft (--set k=v).
#   DISTFT_NP  number of ranks (default 2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$DISTFT_ROOT/launch/install.sh"
cd "$DISTFT_ROOT"
start=$(date +%s)
distft demo-prepare --config configs/demo.yaml
horovodrun -np "${DISTFT_NP:-2}" --gloo python -m distft --config configs/demo.yaml \
  --set train.resume=false "$@"
python - <<'PY'
import json
s = json.load(open("runs/demo/finetune/summary.json"))
how = (f"head {s['best_head']} of {len(s['heads'])}, " if s.get("heads") else "") + (
    f"lbfgs: {s['passes']} passes in {s['solver']['solve_seconds']:.1f} s after the features were cached"
    if s.get("solver") else f"{s['samples_per_sec']:.0f} samples/s")
print(f"\ndemo: {s['world_size']} ranks, val top-1 {s['val_top1']:.3f} (chance 0.200), {how}, "
      f"broadcast {s['bytes_broadcast']:,} B (a full broadcast: {s['bytes_full_broadcast']:,} B); "
      f"model: runs/demo/finetune/model.params")
PY
echo "demo wall time: $(( $(date +%s) - start )) s"
