"""Command line: `distft [train] --config X --set a.b=c`, `plan`, `check`, `make-rec`, `bench`,
`demo-prepare`, `doctor`, and for a trained run `eval`, `predict`, `export`. With no arguments, distft
trains $DISTFT_CONFIG or ./distft.yaml when one exists, else prints its help and exits 2 (a
misconfigured pod fails; it never trains the demo)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from distft import __version__
from distft.config import load_config
from distft.console import end_progress_line
from distft.errors import ConfigError, DistftError, Preempted
from distft.launchenv import PEER_LOST, launcher_rank

# Each command imports what it runs when it runs: `distft doctor` must answer where `import
# mxnet` fails, and no command pays for another's imports (MXNet, Horovod, onnx).

AGREED_EXIT_GRACE_S = 1.0  # see the end of main()
COMMANDS = ("train", "plan", "check", "make-rec", "demo-prepare", "bench", "eval", "predict", "export", "doctor")
DEFAULT_CONFIG = "distft.yaml"

EXAMPLES = """examples:
  distft --config job.yaml                      train (`--config X` alone means `train --config X`)
  horovodrun -np 8 python -m distft -c job.yaml train on 8 ranks
  distft                                        train $DISTFT_CONFIG, else ./distft.yaml
  distft plan -c job.yaml                       which blocks train, BatchNorm modes, bytes
  distft check -c job.yaml                      read every image once: unreadable files, classes, sizes
  distft make-rec photos/ photos.rec            an ImageFolder as RecordIO (.rec + .idx + .classes.json)
  distft eval -c job.yaml --json eval.json      the trained model on data.val: top-1/5, per class
  distft export -c job.yaml --format onnx --output model.onnx
  distft doctor --capability 9.0                can this install run on a GPU of compute capability 9.0?
  distft -c job.yaml --set optimizer.lr=0.01 --set 'freeze.trainable=[features.8, output]'
"""


def default_config() -> str | None:
    """The job a bare `distft` runs: $DISTFT_CONFIG, else ./distft.yaml if it exists."""
    if os.environ.get("DISTFT_CONFIG"):
        return os.environ["DISTFT_CONFIG"]
    return DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML job config (default: $DISTFT_CONFIG, else ./distft.yaml "
                   "if present, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=0.01 (repeatable)")


def parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="distft", formatter_class=raw, epilog=EXAMPLES, description=(
        "Distributed fine-tuning of frozen-backbone MXNet Gluon models on Horovod.\n\n"
        "`distft --config X` alone means `distft train --config X`. With no arguments at all, distft\n"
        "trains $DISTFT_CONFIG or ./distft.yaml when one exists, else prints this help and exits 2.\n"
        "Errors are one line, `distft: error: ...`, naming the config key or file; exit code 2."))
    p.add_argument("--version", action="version", version=f"distft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", formatter_class=raw, help="fine-tune (the default command)", description=(
        "Fine-tune: one process, or N ranks under horovodrun/mpirun/srun. Writes checkpoints,\n"
        "model.params, classes.json, summary.json and config.yaml into train.output; a job started\n"
        "again with the same train.output resumes."))
    _config_args(t)
    pl = sub.add_parser("plan", formatter_class=raw, help="show which blocks train, BN modes and bytes",
                        description=("Build the model on the CPU and show, per block, what trains and what is\n"
                                     "frozen, the BatchNorm modes, the bytes allreduced per step, the\n"
                                     "freeze schedule's stages, and the memory one rank needs (weights,\n"
                                     "gradients, optimizer state, activations of the trainable part; x the\n"
                                     "heads of heads.grid) against this machine's. Trains nothing."))
    _config_args(pl)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.add_argument("--depth", type=int, default=2, help="block depth of the table rows (default 2)")
    ch = sub.add_parser("check", formatter_class=raw, help="read every image of data.train and data.val once",
                        description=("Read every file of data.train and data.val once, on all cores: unreadable\n"
                                     "files, images per class, image sizes (min/median/max). Verdicts are\n"
                                     "cached by (path, size, mtime), so a second check reads only what changed.\n"
                                     "Exit 2 when unreadable files exceed the limit training applies:\n"
                                     "max(data.max_bad_fraction x files, data.max_bad_files)."))
    _config_args(ch)
    ch.add_argument("--jobs", "-j", type=int, default=0, help="processes (default: all cores)")
    ch.add_argument("--cache", default=None,
                    help="verdict cache file (default: ~/.cache/distft/check.json)")
    ch.add_argument("--json", action="store_true", help="print JSON instead of text")
    mr = sub.add_parser("make-rec", formatter_class=raw, help="write an ImageFolder as RecordIO (.rec + .idx)",
                        description=("Write an ImageFolder (one sub-folder per class) as an indexed RecordIO file\n"
                                     "that data.train/data.val accept: OUT.rec, OUT.idx and OUT.classes.json\n"
                                     "(the class names, index = label). Images are read with Pillow, in\n"
                                     "parallel, and stored as they are (--resize re-encodes them as JPEG)."))
    mr.add_argument("folder", help="ImageFolder root")
    mr.add_argument("out", help="output .rec path (the .idx and .classes.json go beside it)")
    mr.add_argument("--resize", type=int, default=0,
                    help="re-encode with the shorter side at this many pixels (default 0: store files as they are)")
    mr.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize (default 95)")
    mr.add_argument("--jobs", "-j", type=int, default=0, help="processes (default: all cores)")
    d = sub.add_parser("demo-prepare", formatter_class=raw, help="make the demo's pretrained backbone if it is missing",
                       description=("Make the demo's pretrained backbone where model.pretrained of --config points,\n"
                                    "if that file is missing: a short training run of --pretrain-config (digits\n"
                                    "0-4) on one process, its model.params copied there. Does nothing when the\n"
                                    "file exists."))
    _config_args(d)
    d.add_argument("--pretrain-config", default=None,
                   help="config of the pretraining run (default: configs/demo-pretrain.yaml beside --config)")
    b = sub.add_parser("bench", formatter_class=raw,
                       help="distft vs a plain Horovod loop vs forward-only, on this machine",
                       description=("Run, on this machine and with the same model, freeze plan, batch and data:\n"
                                    "distft under horovodrun -np N; a plain Horovod-MXNet loop (the baseline);\n"
                                    "forward-only inference (the limit); and distft with the feature cache.\n"
                                    "Prints a Markdown table of samples/s, memory and bytes moved. With\n"
                                    "heads.grid: K heads in one run against one head (samples/s, memory,\n"
                                    "a K-point sweep against K runs), with and without the cache."))
    _config_args(b)
    b.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    b.add_argument("--window", type=int, default=5, help="steps per throughput window (default 5)")
    b.add_argument("--controller", choices=("auto", "gloo", "mpi"), default="auto",
                   help="horovodrun's controller (default auto: the one horovodrun picks itself, MPI when "
                        "Horovod has it)")
    b.add_argument("--repeats", type=int, default=1,
                   help="run limit, baseline and distft this many times in turn; report medians (default 1)")
    b.add_argument("--cache-epochs", type=int, default=3,
                   help="epochs of a distft run with train.cache_features on; epochs after the first "
                        "are compared with the baseline (default 3; 0 skips it)")
    b.add_argument("--no-timeline", dest="timeline", action="store_false",
                   help="with a synchronized BatchNorm, skip the extra run traced with Horovod's timeline "
                        "(per step: what its exchanges waited and moved)")
    b.add_argument("--json", dest="json_path", help="write the results as JSON here")
    b.add_argument("--markdown", dest="md_path", help="write the Markdown table here")
    b.add_argument("--data-only", action="store_true",
                   help="only the training loader on data.train (decode + the job's transform), one pass, "
                        "beside MXNet's ImageRecordIter on the same images; --json: {\"data_only\": {threads, "
                        "images, image_size, samples_per_sec: {distft, recorditer}}}; --repeats R: R alternated passes "
                        "each, at least 3")
    b.add_argument("--threads", type=int, default=1, help="with --data-only: loader threads of both (default 1)")
    e = sub.add_parser("eval", formatter_class=raw, help="evaluate the trained model (train.output/model.params or a "
                       "checkpoint): top-1, top-5, per-class precision/recall, confusion matrix; runs under horovodrun too",
                       description=("Evaluate the trained network (train.output/model.params, a grid's --head, or a\n"
                                    "--checkpoint) with the code training validates with: top-1, top-5 (null with\n"
                                    "5 classes or fewer), loss, per-class precision/recall/count and the confusion\n"
                                    "matrix (JSON, and a PNG beside it). Classes are matched by name. Under\n"
                                    "horovodrun each rank scores a shard."))
    _config_args(e)
    e.add_argument("--data", help="ImageFolder directory or .rec to evaluate on (default: data.val)")
    e.add_argument("--checkpoint", metavar="DIR",
                   help="a checkpoint directory (train.output/checkpoints/ckpt-N): its trainable tensors on "
                        "top of the pretrained model, instead of model.params")
    e.add_argument("--head", help="for grid runs: the head to evaluate (train.output/heads/NAME/model.params)")
    e.add_argument("--json", dest="json_path", required=True,
                   help="write the results here; the confusion-matrix PNG goes beside it (same name, .png)")
    pr = sub.add_parser("predict", formatter_class=raw,
                        help="top-k class names with probabilities for images or folders (JSON or CSV)",
                        description=("Top-k class names with probabilities for image files and folders (walked),\n"
                                     "with the run's network and its preprocessing (preprocess.json). An unreadable\n"
                                     "image gets an error entry and a warning; the others are answered. Under a\n"
                                     "launcher each rank takes a share and rank 0 writes every result, in order."))
    _config_args(pr)
    pr.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders of them")
    pr.add_argument("--top-k", type=int, default=None, help="classes per image (default: min(5, model.classes))")
    pr.add_argument("--output", required=True, help="OUT.json or OUT.csv (columns image,rank,class,prob)")
    pr.add_argument("--head", help="for grid runs: the head to predict with (train.output/heads/NAME/model.params)")
    x = sub.add_parser("export", formatter_class=raw, help="write the trained network for serving (MXNet "
                       "symbol+params or ONNX), check it numerically and print the input spec",
                       description=("Write the trained network for serving: MXNet symbol + params, or ONNX (dynamic\n"
                                    "batch, input `data`). The file is reloaded (SymbolBlock / onnxruntime) and its\n"
                                    "logits compared with the training network's; past 1e-4 nothing is written.\n"
                                    "The preprocessing and class names go beside it (STEM-input.json), which\n"
                                    "launch/serve_onnx.py reads."))
    _config_args(x)
    x.add_argument("--format", choices=("mxnet", "onnx"), required=True)
    x.add_argument("--output", required=True,
                   help="mxnet: PATH-symbol.json and PATH-0000.params; onnx: the .onnx file")
    x.add_argument("--head", help="for grid runs: the head to export (train.output/heads/NAME/model.params)")
    dr = sub.add_parser("doctor", formatter_class=raw, help="what is installed, the driver and GPUs, and whether "
                        "MXNet's kernels run on each GPU", description=(
                            "Read from the installed files: MXNet's and Horovod's versions, the libraries libmxnet.so\n"
                            "needs and where they are, the GPU kernel architectures in libmxnet.so (SASS and PTX),\n"
                            "what Horovod was built with (MPI, Gloo, NCCL); then the driver and every visible GPU\n"
                            "(none without a driver) and whether MXNet's kernels run there. Exit 0: this machine (or\n"
                            "a GPU of --capability) can run distft; 1: it cannot, with one line saying why and the fix."))
    dr.add_argument("--json", dest="json_path", help="write the report as JSON here (whatever the verdict)")
    dr.add_argument("--capability", metavar="X.Y",
                    help="judge a GPU of this compute capability (one you do not have, e.g. 9.0 for an H100)")
    dr.add_argument("--install-check", action="store_true",
                    help="only check that the installed files are consistent (launch/install.sh runs this)")
    return p


def cmd_doctor(args) -> int:
    from distft.gpu import doctor

    if args.capability is not None:
        try:
            doctor.parse_capability(args.capability)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return doctor.main(args.json_path, args.capability, args.install_check)


def require_supported_gpus() -> None:
    """Stop (exit 2, the doctor's line) before anything collective when a GPU this process sees
    cannot run the installed MXNet's kernels, instead of a CUDA error at the first kernel."""
    from distft.gpu import doctor

    doctor.require_supported_gpus()


def cmd_export(args) -> int:
    from distft.inference import export

    export.run(load_config(args.config, args.overrides), args.format, args.output, head=args.head)
    return 0


def cmd_predict(args) -> int:
    from distft.inference import predict

    predict.run(load_config(args.config, args.overrides), args.images, args.output, args.top_k, head=args.head)
    return 0


def cmd_eval(args) -> int:
    from distft.inference import evaluate

    evaluate.run(load_config(args.config, args.overrides), args.json_path, data=args.data,
                 checkpoint_dir=args.checkpoint, head=args.head)
    return 0


def cmd_bench(args) -> int:
    from distft.bench import bench, tables

    for path, flag in ((args.json_path, "--json"), (args.md_path, "--markdown")):
        if path:
            bench.prepare_output(path, flag)
    if args.data_only:
        return _data_only(args)
    result = bench.run(args.config, args.overrides, args.np, args.steps, args.window, args.controller,
                       cache_epochs=args.cache_epochs, repeats=args.repeats, trace=args.timeline)
    table = tables.markdown_grid(result) if "heads" in result else tables.markdown(result)
    print(f"controller: horovodrun --{result['controller']}" + (" (horovodrun's own choice)" if args.controller == "auto"
                                                               else ""))
    print(table)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.md_path:
        with open(args.md_path, "w") as fh:
            fh.write(table)
    return 0


def _data_only(args) -> int:
    from distft.bench import databench

    result, times = databench.run(args.config, args.overrides, args.threads, repeats=max(args.repeats, 3))
    text = databench.table(result, times)
    print(text)
    for path, content in ((args.json_path, json.dumps(result, indent=1)), (args.md_path, text)):
        if path:
            with open(path, "w") as fh:
                fh.write(content)
    return 0


def cmd_train(args) -> int:
    require_supported_gpus()
    from distft.models import zoo
    from distft.train.run import run

    cfg = load_config(args.config or default_config(), args.overrides)
    if cfg.model.pretrained is True:
        # every process of a node, before Horovod starts: one download per node (a file lock),
        # and no collective waits on it
        zoo.fetch(cfg.model.name)
    run(cfg)
    return 0


def cmd_check(args) -> int:
    require_supported_gpus()
    from distft.data import check as datacheck
    from distft.models import network

    cfg = load_config(args.config or default_config(), args.overrides)
    network.check(cfg.model)  # seconds, before minutes of reading images
    return datacheck.main(cfg, jobs=args.jobs, cache_path=args.cache, as_json=args.json)


def cmd_make_rec(args) -> int:
    from distft.data import makerec

    result = makerec.make_rec(args.folder, args.out, resize=args.resize, quality=args.quality, jobs=args.jobs)
    for message in result["skipped"]:
        print(f"skipped (unreadable): {message}")
    print(f"wrote {result['rec']} ({result['records']} images, {len(result['classes'])} classes), "
          f"{result['idx']}, {result['classes_file']}")
    return 0


def cmd_plan(args) -> int:
    import mxnet as mx

    from distft.components import probe
    from distft.data.sets import resolve_model_classes
    from distft.models import freeze, network
    from distft.models.gluon import describe
    from distft.train.memory import memory_lines, plan_memory

    cfg = load_config(args.config or default_config(), args.overrides)
    network.check(cfg.model)  # before data.train is listed
    resolve_model_classes(cfg)
    net = network.create(cfg.model, mx.cpu(), seed=cfg.train.seed)
    spec = describe(net, cfg.model.name, cfg.model.head)
    plan = freeze.plan_at(cfg, spec, 0)
    if cfg.optimizer.name == probe.SOLVER:  # what training would refuse
        probe.check_plan(cfg, plan, net)
    stages, prev, labelled = [], plan, [("freeze.trainable", plan)]
    for e in sorted({s["epoch"] for s in cfg.freeze.schedule}):
        pl = freeze.plan_at(cfg, spec, e)
        stages.append((e, pl, prev))
        at = ", ".join(str(i) for i, s in enumerate(cfg.freeze.schedule) if s["epoch"] == e)
        labelled.append((f"freeze.schedule[{at}] (epoch {e})", pl))
        prev = pl
    memory = plan_memory(cfg, labelled, net)
    if args.json:
        print(json.dumps({**freeze.to_json(plan, spec, args.depth, stages), "memory": memory}, indent=1))
    else:
        print(freeze.to_table(plan, spec, args.depth, stages))
        print(memory_lines(memory))
    return 0


def cmd_demo_prepare(args) -> int:
    from distft.train import demo_prepare

    demo_prepare.ensure_pretrained(args.config, args.overrides, args.pretrain_config)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        if default_config() is None:  # never a demo run: a pod without its config must fail
            parser().print_help(sys.stderr)
            print(f"\ndistft: error: no command and no job: give --config, set DISTFT_CONFIG or put "
                  f"{DEFAULT_CONFIG} in {os.getcwd()}", file=sys.stderr, flush=True)
            return 2
        argv = ["train"]
    elif argv[0] not in COMMANDS + ("-h", "--help", "--version"):
        argv.insert(0, "train")  # `python -m distft --config X` trains
    args = parser().parse_args(argv)
    handler = {"train": cmd_train, "plan": cmd_plan, "check": cmd_check, "make-rec": cmd_make_rec,
               "demo-prepare": cmd_demo_prepare, "bench": cmd_bench, "eval": cmd_eval,
               "predict": cmd_predict, "export": cmd_export, "doctor": cmd_doctor}[args.command]
    agreed_error = False
    try:
        code = handler(args)
    except Preempted as exc:  # not an error: every rank stopped where the job resumes
        agreed_error = True
        end_progress_line()
        rank = launcher_rank()
        print(f"distft{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except DistftError as exc:
        agreed_error = True
        end_progress_line()
        rank = launcher_rank()
        where = f" (rank {rank})" if rank else ""
        print(f"distft: error{where}: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001
        end_progress_line()
        text = str(exc)
        if "Horovod has been shut down" in text or "HorovodInternalError" in type(exc).__name__:
            # a peer rank died or stalled; the launcher and Horovod's stall report name it
            rank = launcher_rank()
            print(f"distft: error (rank {rank}): {PEER_LOST} "
                  "(see the launcher's message and Horovod's stall report); the last completed checkpoint "
                  "is intact, relaunch to resume", file=sys.stderr, flush=True)
            code = 3
        else:
            traceback.print_exc()
            code = 1
    if code and launcher_rank():
        # other ranks may wait in a collective for this one: leave now, without Horovod's
        # shutdown handshake, so the launcher sees the failure and stops the job. An error
        # every rank agreed on reaches them all at once: a moment's grace lets each one's line
        # out before the launcher, seeing the first exit, terminates the others
        sys.stdout.flush()
        sys.stderr.flush()
        if agreed_error:
            time.sleep(AGREED_EXIT_GRACE_S)
        os._exit(code)
    return code
