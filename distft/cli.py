"""Command line: `distft [train] --config X --set a.b=c`, `distft plan`, `distft demo-prepare`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .errors import DistftError

COMMANDS = ("train", "plan", "demo-prepare", "bench")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML job config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=0.01 (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distft", description="Distributed fine-tuning of frozen-backbone "
                                "MXNet Gluon models on Horovod.")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="fine-tune (the default command); launch with horovodrun for N ranks")
    _config_args(t)
    pl = sub.add_parser("plan", help="show which blocks train, BN modes and bytes")
    _config_args(pl)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.add_argument("--depth", type=int, default=2, help="block depth of the table rows (default 2)")
    d = sub.add_parser("demo-prepare", help="make the demo's pretrained backbone if it is missing")
    _config_args(d)
    d.add_argument("--pretrain-config", default=None,
                   help="config of the pretraining run (default: configs/demo-pretrain.yaml beside --config)")
    b = sub.add_parser("bench", help="distft vs a plain Horovod loop vs forward-only, on this machine")
    _config_args(b)
    b.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    b.add_argument("--window", type=int, default=5, help="steps per throughput window (default 5)")
    b.add_argument("--controller", choices=("gloo", "mpi"), default="gloo")
    b.add_argument("--repeats", type=int, default=1,
                   help="run limit, baseline and distft this many times in turn; report medians (default 1)")
    b.add_argument("--cache-epochs", type=int, default=3,
                   help="epochs of a distft run with train.cache_features on; epochs after the first "
                        "are compared with the baseline (default 3; 0 skips it)")
    b.add_argument("--json", dest="json_path", help="write the results as JSON here")
    b.add_argument("--markdown", dest="md_path", help="write the Markdown table here")
    return p


def cmd_bench(args) -> int:
    from . import bench

    result = bench.run(args.config, args.overrides, args.np, args.steps, args.window, args.controller,
                       cache_epochs=args.cache_epochs, repeats=args.repeats)
    table = bench.markdown(result)
    print(table)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.md_path:
        with open(args.md_path, "w") as fh:
            fh.write(table)
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run

    run(load_config(args.config, args.overrides))
    return 0


def cmd_plan(args) -> int:
    import mxnet as mx

    from . import freeze, model
    from .config import load_config
    from .data import resolve_model_classes

    cfg = load_config(args.config, args.overrides)
    resolve_model_classes(cfg)
    net = model.create(cfg.model, mx.cpu(), seed=cfg.train.seed)
    spec = model.describe(net, cfg.model.name, cfg.model.head)
    plan = freeze.resolve(spec, cfg.freeze.trainable, cfg.freeze.batchnorm, cfg.freeze.schedule, 0)
    stages, prev = [], plan
    for e in sorted({s["epoch"] for s in cfg.freeze.schedule}):
        pl = freeze.resolve(spec, cfg.freeze.trainable, cfg.freeze.batchnorm, cfg.freeze.schedule, e)
        stages.append((e, pl, prev))
        prev = pl
    if args.json:
        print(json.dumps(freeze.to_json(plan, spec, args.depth, stages), indent=1))
    else:
        print(freeze.to_table(plan, spec, args.depth, stages))
    return 0


def cmd_demo_prepare(args) -> int:
    from . import demo_prepare

    demo_prepare.ensure_pretrained(args.config, args.overrides, args.pretrain_config)
    return 0


def _rank() -> str:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var]
    return ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "train")  # `python -m distft --config X` trains
    args = parser().parse_args(argv)
    handler = {"train": cmd_train, "plan": cmd_plan, "demo-prepare": cmd_demo_prepare,
               "bench": cmd_bench}[args.command]
    try:
        code = handler(args)
    except DistftError as exc:
        rank = _rank()
        where = f" (rank {rank})" if rank else ""
        print(f"distft: error{where}: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "Horovod has been shut down" in text or "HorovodInternalError" in type(exc).__name__:
            # a peer rank died or stalled; the launcher and Horovod's stall report name it
            rank = _rank()
            print(f"distft: error (rank {rank}): Horovod shut down: another rank failed, was killed or stalled "
                  "(see the launcher's message and Horovod's stall report); the last completed checkpoint "
                  "is intact, relaunch to resume", file=sys.stderr, flush=True)
            code = 3
        else:
            traceback.print_exc()
            code = 1
    if code and _rank():
        # other ranks may wait in a collective for this one: leave now, without Horovod's
        # shutdown handshake, so the launcher sees the failure and stops the job
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
