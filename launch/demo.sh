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
print(f"\ndemo: {s['world_size']} ranks, val top-1 {s['val_top1']:.3f} (chance 0.200), "
      f"{s['samples_per_sec']:.0f} samples/s, broadcast {s['bytes_broadcast']:,} B "
      f"(a full broadcast: {s['bytes_full_broadcast']:,} B); model: runs/demo/finetune/model.params")
PY
echo "demo wall time: $(( $(date +%s) - start )) s"
