"""distft's linear probe (optimizer.name: lbfgs) beside scikit-learn on the same features.

    python -m distft.bench.probebench --config configs/demo.yaml [--np 2] [--set k=v ...] [--markdown out.md]

Extracts the frozen features of data.train and data.val once, the way the job does (the
config's model, pretrained file, freeze plan and preprocessing, through the network's frozen
prefix), and fits scikit-learn's LogisticRegression (its default lbfgs solver and tolerance,
max_iter 10,000) over a C grid on them. Then runs the job itself (`--np` ranks under
horovodrun --gloo, or in this process) and prints both: per C and per head, val top-1 and the
time; for distft its passes, its objective and the seconds after its features were cached.
Each distft head is also evaluated on the features extracted here, from the model.params it
wrote: the objective recomputed from them matches the job's (`same_features` in the JSON).
C = 1 / (weight_decay x N) makes the two objectives the same (probe.py)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import mxnet as mx
import numpy as np

from distft.components import probe
from distft.components.objective import Objective
from distft.config import dump_config, load_config
from distft.distributed.world import LocalWorld
from distft.models import gluon, network
from distft.runfolder import RunFolder
from distft.train import builders

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def extract(cfg) -> dict:
    """{"train": (x, y), "val": (x, y)}: float64 features and labels, through the job's prefix."""
    world, ctx = LocalWorld(), mx.cpu()
    sets = builders.open_data(cfg, world, lambda msg: None)
    net = network.create(cfg.model, ctx, seed=cfg.train.seed)
    prepared = builders.build_network(cfg, world, net, gluon.describe(net, cfg.model.name, cfg.model.head), 0, ctx)
    data = builders.build_data(cfg, world, probe.batching(len(sets.train), world, cfg.data.batch_size), sets)
    out = {}
    for role, loader, dataset in (("train", data.train_loader, sets.train), ("val", data.val_loader, sets.val)):
        batches = probe.in_batches(np.arange(len(dataset)), cfg.data.batch_size)
        parts = [(x, y) for _, x, y in probe.features(prepared.runner, loader, ctx, batches)]
        out[role] = (np.concatenate([x for x, _ in parts]).astype(np.float64), np.concatenate([y for _, y in parts]))
    data.close()
    return out


def scikit_learn(feats: dict, grid) -> list[dict]:
    from sklearn.linear_model import LogisticRegression

    (x, y), (x_val, y_val) = feats["train"], feats["val"]
    rows = []
    for c in grid:
        start = time.perf_counter()
        fit = LogisticRegression(C=c, max_iter=10000).fit(x, y)
        rows.append({"C": c, "weight_decay": 1.0 / (c * len(y)), "train_top1": fit.score(x, y),
                     "val_top1": fit.score(x_val, y_val), "iterations": int(fit.n_iter_[0]),
                     "seconds": time.perf_counter() - start})
    return rows


def distft_run(config: str, overrides: list, np_: int, out: str) -> dict:
    cfg = load_config(config, overrides + [f"train.output={out}", "train.resume=false", "metrics.port=0",
                                           "metrics.report=false"])
    path = os.path.join(os.path.dirname(out), "probebench.yaml")
    dump_config(cfg, path)
    cmd = [sys.executable, "-m", "distft", "--config", path]
    if np_ > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(np_), "--gloo"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"probebench: the distft run failed (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    with open(RunFolder(out).summary) as fh:
        return json.load(fh)


def recomputed(feats: dict, params_path: str, wd: float, head: str) -> tuple[float, float]:
    """(objective without smoothing, train top-1) at a model.params, on the features extracted here."""
    x, y = feats["train"]
    arrays = {k: v.asnumpy().astype(np.float64) for k, v in mx.nd.load(params_path).items()}
    weight, bias = arrays[f"{head}.weight"], arrays[f"{head}.bias"]
    obj = Objective(len(y), weight.shape[0], weight.shape[1], [wd], [0.0], False)
    point = np.concatenate([weight.ravel(), bias])[None]
    f = float(obj.totals(point, np.array([0]), obj.local_sums(point, np.array([0]), [(x, y)]))[1][0])
    return f, float(((x @ weight.T + bias).argmax(axis=1) == y).mean())


def table(sk: list[dict], heads: list[dict], summary: dict) -> str:
    lines = ["| | C | weight_decay | val top-1 | train top-1 | iterations / passes | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sk:
        lines.append(f"| scikit-learn | {r['C']:g} | {r['weight_decay']:.3g} | {r['val_top1']:.4f} | "
                     f"{r['train_top1']:.4f} | {r['iterations']} | {r['seconds']:.2f} |")
    for h in heads:
        lines.append(f"| distft {h['name']} | {h['C']:.3g} | {h['weight_decay']:g} | {h['val_top1']:.4f} | "
                     f"{h['train_top1']:.4f} | {h['evaluations']} | - |")
    best_sk = max(sk, key=lambda r: r["val_top1"])
    lines.append("")
    lines.append(f"scikit-learn's best: {best_sk['val_top1']:.4f} (C = {best_sk['C']:g}); distft: "
                 f"{summary['val_top1']:.4f} (head {summary.get('best_head')}), {summary['passes']} passes in "
                 f"{summary['solver']['solve_seconds']:.2f} s after {summary['solver']['feature_seconds']:.2f} s "
                 f"of feature extraction, {summary['world_size']} rank(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distft.bench.probebench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--np", dest="np_", type=int, default=1, help="ranks of the distft run (horovodrun --gloo)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.optimizer.name != probe.SOLVER:
        raise SystemExit("probebench: the config's optimizer.name must be lbfgs (--set optimizer.name=lbfgs)")
    feats = extract(cfg)
    n = len(feats["train"][1])
    decays = cfg.heads.grid.get("optimizer.weight_decay") or [cfg.optimizer.weight_decay]
    sk = scikit_learn(feats, sorted(set(C_GRID) | {1.0 / (wd * n) for wd in decays}))  # and each head's C
    with tempfile.TemporaryDirectory(prefix="distft-probebench-") as work:
        out = os.path.join(work, "run")
        summary = distft_run(args.config, args.overrides, args.np_, out)
        heads = summary.get("heads") or [{"name": "h0", "overrides": {}, "val_top1": summary["val_top1"],
                                          "objective": summary["objective"]}]
        for h, fig in zip(heads, summary["solver"]["heads"]):
            wd = h["overrides"].get("optimizer.weight_decay", cfg.optimizer.weight_decay)
            path = RunFolder(out).head_model(h["name"]) if summary.get("heads") else RunFolder(out).model
            objective_here, train_top1 = recomputed(feats, path, wd, cfg.model.head)
            h.update(weight_decay=wd, C=1.0 / (wd * n), evaluations=fig["evaluations"], train_top1=train_top1,
                     objective_here=objective_here)
    same = all(abs(h["objective_here"] - h["objective"]) <= 1e-5 * abs(h["objective"]) for h in heads
               if not cfg.train.label_smoothing)
    text = table(sk, heads, summary)
    print(text)
    print(f"same features: {same} (each head's objective recomputed here from its model.params)")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"scikit_learn": sk, "distft": {"heads": heads, "val_top1": summary["val_top1"],
                                                      "passes": summary["passes"], "solver": summary["solver"],
                                                      "world_size": summary["world_size"]},
                       "same_features": same, "samples": n}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
