"""`distft export`: the trained network for serving, checked as it is written.

- `mxnet`: `HybridBlock.export` (PATH-symbol.json, PATH-0000.params), for MXNet Model Server
  and the C++/Scala predict APIs.
- `onnx`: PATH (.onnx) via MXNet's own exporter (`mx.onnx.export_model`), batch dimension
  dynamic, weights as initializers (constants) with `data` the only input. Needs the `export`
  extra (onnx < 1.19: MXNet 1.9.1's exporter imports `onnx.mapping`, which onnx 1.19 removed;
  onnxruntime for the check).

The graph takes the normalised NCHW float32 tensor the network itself takes; preprocessing stays
outside it and is printed (and written beside the export as STEM-input.json, with the class
names). Each export is reloaded (SymbolBlock / onnxruntime) and its logits compared with the
training network's on a batch; past MAX_ABS_DIFF the files are removed and the export fails.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np

from distft.errors import ModelError
from distft.inference import trained

MAX_ABS_DIFF = 1e-4
CHECK_BATCH = 4
EXTRA_HINT = "pip install -c launch/constraints.txt -e '.[export]'"


def _check_batch(prep) -> np.ndarray:
    """A batch of what the network sees: normalised images (about zero mean, unit variance)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal(prep.input_shape(CHECK_BATCH)).astype(np.float32)


def stem(output: str, fmt: str) -> str:
    return output[:-5] if fmt == "onnx" and output.lower().endswith(".onnx") else output


def export_mxnet(net, path: str) -> list[str]:
    net.export(path, epoch=0)
    return [f"{path}-symbol.json", f"{path}-0000.params"]


def run_mxnet(files: list[str], x: np.ndarray) -> np.ndarray:
    import mxnet as mx
    from mxnet import gluon

    block = gluon.SymbolBlock.imports(files[0], ["data"], files[1], ctx=mx.cpu())
    return block(mx.nd.array(x)).asnumpy()


def export_onnx(net, path: str, input_shape: tuple) -> list[str]:
    try:
        import onnx
        from mxnet.onnx import export_model  # imports onnx.mapping
    except ImportError as exc:
        raise ModelError(f"--format onnx: needs the export extra ({exc}); {EXTRA_HINT}") from None
    with tempfile.TemporaryDirectory() as tmp:
        sym, params = export_mxnet(net, os.path.join(tmp, "net"))
        export_model(sym, params, in_shapes=[input_shape], in_types=[np.float32], onnx_file_path=path,
                     dynamic=True, dynamic_input_shapes=[(None,) + tuple(input_shape[1:])])
    weights_as_constants(onnx, path)
    onnx.checker.check_model(path)
    return [path]


def weights_as_constants(onnx, path: str) -> None:
    """MXNet 1.9.1's exporter lists every weight as a graph input as well as an initializer:
    onnxruntime then treats weights as inputs a caller may override, cannot fold constants,
    and warns once per weight per session. Only `data` stays an input."""
    proto = onnx.load(path)
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    onnx.save(proto, path)


def run_onnx(files: list[str], x: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(f"--format onnx: checking the export needs onnxruntime ({exc}); {EXTRA_HINT}") from None
    session = ort.InferenceSession(files[0], providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run(cfg, fmt: str, output: str, log=print, head: Optional[str] = None) -> dict:
    """Export the run's network (`head`: a grid's head by name), reload it and compare."""
    import mxnet as mx

    ctx = mx.cpu()
    names = trained.run_classes(cfg)  # the run's classes (classes.json), model.classes: auto or not
    # float32 graph whatever train.precision was: weights are float32, AMP's casts stay out
    net, source = trained.load_network(cfg, ctx, head=head, enable_precision=False)
    prep = trained.preprocessing(cfg)
    x = _check_batch(prep)
    reference = trained.runner(cfg, net, ctx)(mx.nd.array(x, ctx=ctx)).asnumpy()  # as training ran it
    net.hybridize()  # one graph for the whole network (export needs the top block's graph)
    net(mx.nd.array(x, ctx=ctx)).wait_to_read()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    if fmt == "mxnet":
        files = export_mxnet(net, output)
        got = run_mxnet(files, x)
    else:
        files = export_onnx(net, output, prep.input_shape(CHECK_BATCH))
        got = run_onnx(files, x)
    diff = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
    if not diff <= MAX_ABS_DIFF:
        for path in files:
            if os.path.exists(path):
                os.remove(path)
        raise ModelError(f"--format {fmt}: the reloaded export's logits differ from the training network's by "
                         f"{diff:.3g} (limit {MAX_ABS_DIFF:g}); nothing written")
    side = stem(output, fmt) + "-input.json"
    with open(side, "w") as fh:
        json.dump({"input": prep.to_json(), "input_name": "data", "classes": names}, fh, indent=1)
    files.append(side)
    log(f"export: {source} -> {', '.join(files)}")
    log(f"checked: reloaded, logits on a batch of {CHECK_BATCH} within {diff:.2g} of the training network's "
        f"(limit {MAX_ABS_DIFF:g})")
    for line in prep.spec_lines():
        log(line)
    return {"format": fmt, "files": files, "max_abs_diff": diff, "input": prep.to_json()}
