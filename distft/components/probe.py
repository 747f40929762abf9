"""The linear probe: a head-only plan trained to its optimum on the frozen features
(`optimizer.name: lbfgs`), and the same objective measured at the end of an SGD run.

The objective, per head (its own `optimizer.weight_decay` wd and `train.label_smoothing` e):

    f(W, b) = 1/N sum_i CE_e(W x_i + b, y_i) + wd/2 ||W||^2   (+ wd/2 ||b||^2 with optimizer.decay_bias_and_bn)

over the N samples of data.train, x_i the frozen prefix's output for sample i (flattened),
CE_e the cross-entropy against (1 - e) one-hot(y_i) + e / classes. It is the SGD path's: there
the gradient is the mean loss of the batch plus MXNet's wd x w on every tensor whose wd_mult is
1 (weights; biases only with decay_bias_and_bn, optim.py), which is the gradient of f. It is
scikit-learn's LogisticRegression (multinomial, bias unpenalised) with C = 1 / (wd N).

Distribution. data.train is cut into blocks of data.batch_size consecutive samples; rank r
holds blocks r, r + size, ... (every sample on exactly one rank). A block's features go once
through the frozen prefix, as one batch, into a FeatureCache. A pass evaluates every head still
solving on each of the rank's blocks in float64, turns each block's sums into fixed point (two
float64 words holding integers, at a scale every rank derives from agreed numbers) and adds
them up; one allreduce (float64, a sum, exact on integers below 2**53) adds the ranks' words,
with the stop ballot in its last slot. A block's sums do not depend on which rank computes
them, and integer sums do not depend on their order, so the totals are the same bits on any
world size: every head's L-BFGS machine (lbfgs.py) takes the same branches and ends with the
same weights on 1, 2 or 4 ranks, and again on a relaunch.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import mxnet as mx
import numpy as np
from threadpoolctl import threadpool_limits

from distft import precision
from distft.components.cache import FeatureCache
from distft.components.lbfgs import LBFGS, NOT_FINITE
from distft.components.objective import HIGH_BITS, LOW_WORD, Objective
from distft.components.state import Batching
from distft.distributed.agreement import agreed
from distft.distributed.bnchannel import open_channel
from distft.errors import CheckpointError, ConfigError
from distft.models.network import linear_head_problem
from distft.runfolder import RunFolder

SOLVER = "lbfgs"
MEAN = f"{SOLVER}.feature_mean"  # a checkpoint's array: the features' mean (the solve's coordinates)
HISTORY_BYTES = 256 * 2 ** 20  # optimizer.history: auto, per head


# --- which plans it takes ----------------------------------------------------------------------------

def plan_problem(cfg, plan, net) -> Optional[str]:
    """Why this freeze plan is not a linear head on a frozen prefix (None: it is)."""
    head = cfg.model.head
    trained = [n for n in plan.trainable_names() if not (n == head or n.startswith(head + "."))]
    stages = [s for s in plan.suffix or [] if any(n.startswith(s + ".") for n in trained)]
    others = stages or sorted({n.rpartition(".")[0] for n in trained})
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"the plan also trains {', '.join(others[:3])}{more}"
    if plan.suffix is None:
        return f"{cfg.model.name} does not run as a frozen prefix, then {head}"
    if plan.suffix != [head]:
        rest = [s for s in plan.suffix if s != head]
        return (f"{', '.join(rest[:3])} would run beside the head, outside the frozen prefix "
                f"(freeze.batchnorm: {cfg.freeze.batchnorm})")
    return linear_head_problem(net, head)


def check_plan(cfg, plan, net) -> None:
    problem = plan_problem(cfg, plan, net)
    if problem:
        raise ConfigError(f"optimizer.name: lbfgs trains a linear head alone on frozen features (freeze.trainable: "
                          f"[{cfg.model.head}]); {problem}")


# --- features ----------------------------------------------------------------------------------------

def blocks(samples: int, world, block: int) -> list[np.ndarray]:
    """This rank's blocks of data.train: blocks r, r + size, ... of `block` consecutive samples."""
    return [np.arange(start, min(start + block, samples))
            for start in range(world.rank * block, samples, world.size * block)]


def batching(samples: int, world, batch_size: int) -> Batching:
    """A solve takes all of data.train at every step (one pass over the features)."""
    mine = sum(len(b) for b in blocks(samples, world, batch_size))
    return Batching(samples, world.size, mine, batch_size, -(-mine // batch_size))


def in_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def features(runner, loader, ctx, batches: list, cache=None, beat=None, count: bool = True) -> Iterator:
    """(indices, features float32 (n, D), labels) for each batch of data-set indices: from
    `cache` where it holds the batch, else through the frozen prefix (inference mode) and into
    `cache`. `count`: the cache counts these reads (not when they only measure)."""
    skip = cache.has_all if cache is not None else None
    for _, idx, x, y in loader.iterate(list(enumerate(batches)), 0, skip=skip):
        if x is None:
            out = cache.get(idx, count)
        else:
            out = precision.to_float32(runner.features(mx.nd.array(x, ctx=ctx))).asnumpy()
            if cache is not None:
                cache.put(idx, out, count)
        if beat is not None:
            beat()
        yield idx, out.reshape(len(idx), -1), np.asarray(y, dtype=np.int64)


def agreed_max(world, value: float) -> float:
    """The largest of every rank's `value`."""
    return max(world.allgather_json(float(value), "distft.probe_max")) if world.size > 1 else value


def agreed_sums(world, local: np.ndarray, stop: bool, channel=None) -> tuple[np.ndarray, bool]:
    """Every rank's sums added up (float64), and whether any rank asked to stop: one allreduce,
    through `channel` (bnchannel's MPI channel) when given, else through the world."""
    flat = np.concatenate([local.ravel(), [1.0 if stop else 0.0]])
    if channel is not None:
        total = channel.allreduce(flat, "forward", "probe")
    else:
        total = np.asarray(world.allreduce_numpy(flat, "distft.probe"), dtype=np.float64)
    return total[:-1].reshape(local.shape), bool(total[-1] > 0)


# --- heads as points ---------------------------------------------------------------------------------

def head_arrays(head, name: str) -> list:
    """The head block's Parameters (weight, then bias when it has one) of a head of the grid."""
    return [head.all_params[n] for n in (f"{name}.weight", f"{name}.bias") if n in head.all_params]


def read_point(head, name: str) -> np.ndarray:
    return np.concatenate([p.data().asnumpy().astype(np.float64).ravel() for p in head_arrays(head, name)])


def write_point(head, name: str, point: np.ndarray) -> None:
    start = 0
    for p in head_arrays(head, name):
        size = int(np.prod(p.shape))
        p.set_data(mx.nd.array(point[start:start + size].reshape(p.shape), ctx=p.list_ctx()[0], dtype=p.dtype))
        start += size


def objective_for(cfg, heads, samples: int) -> Objective:
    arrays = head_arrays(heads[0], cfg.model.head)
    return Objective(samples, int(arrays[0].shape[0]), int(np.prod(arrays[0].shape[1:])),
                     [h.cfg.optimizer.weight_decay for h in heads], [h.cfg.train.label_smoothing for h in heads],
                     cfg.optimizer.decay_bias_and_bn, bias=len(arrays) > 1)


def history_pairs(setting, size: int) -> int:
    """optimizer.history: a number, or `auto`: what fits in HISTORY_BYTES, 10 to 100 pairs."""
    if setting != "auto":
        return int(setting)
    return int(min(100, max(10, HISTORY_BYTES // (2 * 8 * size))))


# --- the solver --------------------------------------------------------------------------------------

class LinearProbe:
    """Every head of the run (one without a grid) solved by its own L-BFGS machine, all of them
    in the same passes over this rank's features. State: the machines (`state_dict`)."""

    def __init__(self, cfg, world, heads, samples: int, ctx):
        self.cfg, self.world, self.heads, self.ctx = cfg, world, heads, ctx
        self.name = cfg.model.head
        self.blocks = blocks(samples, world, cfg.data.batch_size)
        self.indices = np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.int64)
        self.objective = objective_for(cfg, heads, samples)
        opt = cfg.optimizer
        self.history = history_pairs(opt.history, self.objective.size)
        # from zero (as scikit-learn starts): the optimum is unique, and a weakly penalised head
        # takes many more passes to shed a random start
        self.machines = [LBFGS(np.zeros(self.objective.size), opt.tol, self.history, self.objective.gradient_norm)
                         for _ in heads]
        self.cache = FeatureCache(self.indices, cfg.train.cache_dtype, cfg.train.cache_memory_bytes,
                                  RunFolder(cfg.train.output).cache, world.rank) if len(self.indices) else None
        # a pass's one allreduce waits on the critical path: through the statistics channel
        # (dist.bn_channel) where that is MPI (microseconds), else Horovod's queue (milliseconds)
        channel = open_channel(cfg.dist.bn_channel, world)  # collective: every rank, in set-up
        self.channel = channel if channel.name == "mpi" else None
        self.labels: list[np.ndarray] = []  # per block
        self.feature_max = 0.0  # the largest |feature| of data.train (agreed)
        self.losses = [None] * len(heads)  # each head's mean cross-entropy at its last evaluation
        self.bytes_per_step = 8 * (2 * len(heads) * (2 + self.objective.size) + 1) if world.size > 1 else 0
        self.seconds_total = 0.0  # waited on the allreduce
        self.extract_seconds = 0.0
        self.solve_seconds = 0.0  # this launch's passes, from the features cached to the solution (set by the job)
        self.passes = 0  # of this launch

    @property
    def done(self) -> bool:
        return all(m.done for m in self.machines)

    def threads(self):
        """A context in which numpy's BLAS runs one thread. Its products' bits depend on its
        thread count (measured: the demo's objective differed in the last bits between 1 rank
        with 2 threads and 2 ranks with 1), and the totals must not depend on how many ranks
        share a node. It is faster here too: ranks that share a node (and MXNet's own threads)
        oversubscribe it, and a pass is small products whose threads spin (the demo, 2 ranks
        on 2 cores: 2.3 to 2.7 s against 3.9 to 6.4 s, load ~3.8)."""
        return threadpool_limits(1, user_api="blas")

    def extract(self, runner, loader, beat=None) -> None:
        """This rank's features, once, a block per batch, into the cache (what every pass
        reads); the largest |feature| and (unless a checkpoint gave it) the features' mean,
        both agreed, the mean to the same bits on any world size."""
        start = time.perf_counter()
        largest = 0.0
        for _, x, y in features(runner, loader, self.ctx, self.blocks, self.cache, beat):
            self.labels.append(y)
            largest = max(largest, float(np.abs(x).max())) if len(x) else largest
        self.feature_max = agreed_max(self.world, largest)
        if self.objective.bias and self.objective.mean is None:
            exponent = HIGH_BITS - np.frexp(max(self.feature_max * self.objective.samples, 1e-300))[1]
            words = np.zeros((2, self.objective.dim))
            for x, _ in self.chunks():
                scaled = np.ldexp(np.asarray(x, dtype=np.float64).sum(axis=0), exponent)
                words[0] += np.floor(scaled)
                words[1] += np.floor((scaled - np.floor(scaled)) * LOW_WORD)
            total, _ = agreed_sums(self.world, words, False)
            self.objective.mean = Objective.from_fixed(total, exponent) / self.objective.samples
        self.extract_seconds = time.perf_counter() - start

    def chunks(self) -> Iterator:
        for idx, y in zip(self.blocks, self.labels):
            yield self.cache.get(idx), y

    def step(self, stop: bool) -> bool:
        """One pass: every head still solving evaluated at the point its machine asks for.
        Returns whether any rank asked to stop (agreed)."""
        active = np.array([i for i, m in enumerate(self.machines) if not m.done], dtype=np.int64)
        points = np.stack([self.machines[i].point() for i in active])
        exponents = self.objective.exponents(points, self.feature_max)
        local = self.objective.local_sums(points, active, self.chunks(), exponents)
        waited = time.perf_counter()
        words, stopped = agreed_sums(self.world, local, stop, self.channel)
        self.seconds_total += time.perf_counter() - waited
        loss, f, grad = self.objective.totals(points, active, self.objective.from_fixed(words, exponents))
        for j, i in enumerate(active):
            self.losses[i] = float(loss[j])
            self.machines[i].tell(f[j], grad[j])
        self.passes += 1
        return stopped

    def write_weights(self) -> None:
        """Each head's current point (its solution once done) into its Parameters."""
        for h, m in zip(self.heads, self.machines):
            write_point(h, self.name, self.objective.original(m.x))

    def not_finite(self) -> list:
        """The heads whose objective is not finite at their starting point."""
        return [h for h, m in zip(self.heads, self.machines) if m.status == NOT_FINITE]

    def figures(self) -> list[dict]:
        """Per head: the objective and gradient norm at its current point, iterations, status."""
        return [{"objective": m.f, "gradient_norm": m.gradient_norm, "iterations": m.iterations,
                 "evaluations": m.evaluations, "status": m.status} for m in self.machines]

    def summary(self) -> dict:
        """summary.json's `solver`: per head (in head order) its figures; this launch's timings."""
        channel = self.channel.name if self.channel is not None else "horovod" if self.world.size > 1 else "local"
        return {"name": SOLVER, "tol": self.cfg.optimizer.tol, "history": self.history, "channel": channel,
                "samples": self.objective.samples, "passes_this_run": self.passes,
                "feature_seconds": self.extract_seconds, "solve_seconds": self.solve_seconds,
                "heads": self.figures()}

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`arrays`: the machines' arrays keyed `lbfgs.<head>.<name>` (float64 NDArrays, what a
        checkpoint's optimizer file holds); `lbfgs`: their numbers per head (its metadata)."""
        arrays, numbers = {}, {}
        for h, m in zip(self.heads, self.machines):
            a, n = m.state_dict()
            arrays.update({f"{SOLVER}.{h.name}.{k}": mx.nd.array(v, dtype=np.float64) for k, v in a.items()})
            numbers[h.name] = n
        if self.objective.mean is not None:  # the machines' coordinates
            arrays[MEAN] = mx.nd.array(self.objective.mean, dtype=np.float64)
        return {"arrays": arrays, SOLVER: numbers}

    def _check_state(self, arrays: dict, meta: dict) -> None:
        """Rank 0: the checkpoint holds every machine's arrays."""
        numbers = _numbers(meta, self.heads)
        for name, shape in self._shapes(numbers).items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                raise CheckpointError(f"optimizer state {name}: missing or mis-shaped in the checkpoint")

    def _shapes(self, numbers: dict) -> dict:
        """The checkpoint's arrays: every machine's, and the features' mean (centred coordinates)."""
        shapes = {f"{SOLVER}.{h.name}.{key}": tuple(shape) for h in self.heads
                  for key, shape in numbers[h.name]["shapes"].items()}
        if self.objective.bias:
            shapes[MEAN] = (self.objective.dim,)
        return shapes

    def load_state_dict(self, state: dict) -> int:
        """The machines from a checkpoint that rank 0 read (`state["arrays"]`: its NDArrays there,
        {} elsewhere; the rest: its metadata, on every rank). Returns the bytes broadcast."""
        world, arrays = self.world, state["arrays"]
        agreed(world, "restoring the solver state", lambda: self._check_state(arrays, state))
        numbers = _numbers(state, self.heads)
        received = {name: arrays[name].astype(np.float64).as_in_context(mx.cpu()) if world.rank == 0 else
                    mx.nd.zeros(shape, dtype=np.float64) for name, shape in self._shapes(numbers).items()}
        names = sorted(received)
        sent = world.broadcast_([received[n] for n in names], "distft.probe_state") if world.size > 1 and names else 0
        for h, m in zip(self.heads, self.machines):
            key = f"{SOLVER}.{h.name}."
            m.load_state_dict({n[len(key):]: received[n].asnumpy() for n in names if n.startswith(key)},
                              numbers[h.name])
        if MEAN in received:
            self.objective.mean = received[MEAN].asnumpy()
        return sent


def _numbers(meta: dict, heads) -> dict:
    numbers = meta.get(SOLVER)
    if not isinstance(numbers, dict) or set(numbers) != {h.name for h in heads}:
        raise CheckpointError("the checkpoint holds no lbfgs state for these heads (was it written with another "
                              "optimizer?)")
    return numbers


def finished(meta: Optional[dict]) -> bool:
    """Whether a checkpoint's solve had ended for every head (converged or stopped for good)."""
    numbers = (meta or {}).get(SOLVER)
    return isinstance(numbers, dict) and bool(numbers) and all(n.get("phase") == "done" for n in numbers.values())


def measure(cfg, world, heads, samples: int, chunks: Iterable) -> list[dict]:
    """The objective and its gradient norm at the heads' current weights, from one pass over
    `chunks` (this rank's share of data.train, (features, labels) blocks): what an SGD run
    reports at its end."""
    objective = objective_for(cfg, heads, samples)
    active = np.arange(len(heads))
    points = np.stack([read_point(h, cfg.model.head) for h in heads])
    sums, _ = agreed_sums(world, objective.local_sums(points, active, chunks), False)
    _, f, grad = objective.totals(points, active, sums)
    return [{"objective": float(fi), "gradient_norm": float(np.linalg.norm(gi))} for fi, gi in zip(f, grad)]
