"""optimizer.name: lbfgs: a head-only plan solved to its optimum on the frozen features. The
solver and the objective as plain numpy; the optimum against scikit-learn's on features this
test extracts itself; the same weights on 1, 2 and 4 ranks and across a stop; the objective an
SGD run reports at its end; the plans it refuses."""
import re
import shutil

import numpy as np
import pytest
import mxnet as mx
from mxnet.gluon import nn

from distft.components import lbfgs
from distft.models import network as model
from distft.components.objective import Objective
from distft.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from distft.data.transforms import Transform
from distft.data.demo import dataset
from distft.distributed.world import LocalWorld
from distft.errors import ConfigError
from distft.train.run import run

from conftest import horovodrun, load_params, read_summary, run_cli, small_config, write_config


def minimise(machine, evaluate, limit=10000):
    while not machine.done and machine.evaluations < limit:
        machine.tell(*evaluate(machine.point()))
    return machine


# --- the L-BFGS machine -------------------------------------------------------------------------------

def quadratic(n=40, seed=0, condition=1e4):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T
    b = rng.standard_normal(n)
    return a, b, lambda x: (0.5 * x @ a @ x - b @ x, a @ x - b)


def test_lbfgs_reaches_the_minimum_of_an_ill_conditioned_quadratic_to_tol():
    a, b, evaluate = quadratic()
    m = minimise(lbfgs.LBFGS(np.zeros(len(b)), tol=1e-8, history=10), evaluate)
    assert m.status == lbfgs.CONVERGED and m.gradient_norm <= 1e-8
    assert np.abs(m.x - np.linalg.solve(a, b)).max() < 1e-6


def test_a_non_finite_start_ends_the_machine_and_a_non_finite_trial_shortens_the_step():
    m = lbfgs.LBFGS(np.zeros(3), tol=1e-8)
    m.tell(float("nan"), np.zeros(3))
    assert m.done and m.status == lbfgs.NOT_FINITE
    _, _, evaluate = quadratic(n=3)
    m = lbfgs.LBFGS(np.zeros(3), tol=1e-8)
    m.tell(*evaluate(m.point()))
    m.tell(float("inf"), np.full(3, np.nan))  # the first trial step overflows
    assert not m.done and m.t < 1.0 / np.linalg.norm(evaluate(np.zeros(3))[1])
    assert minimise(m, evaluate).status == lbfgs.CONVERGED


def test_the_compact_inverse_hessian_is_the_two_loop_recursion():
    rng = np.random.default_rng(1)
    memory, pairs = lbfgs.Memory(5, 30), []
    for _ in range(8):  # more pairs than it keeps: the ring wraps
        s = rng.standard_normal(30)
        y = s * rng.uniform(0.5, 2.0, 30)
        memory.push(s, y)
        pairs = (pairs + [(s, y)])[-5:]
    g = rng.standard_normal(30)
    q, alphas = g.copy(), []
    for s, y in reversed(pairs):
        alphas.append((s @ q) / (s @ y))
        q -= alphas[-1] * y
    r = (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1]) * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += (alpha - (y @ r) / (s @ y)) * s
    assert np.abs(memory.inverse_hessian_times(g) - r).max() <= 1e-12 * np.abs(r).max()


def test_a_machine_restored_mid_line_search_continues_with_the_same_bits():
    _, _, evaluate = quadratic(seed=2)
    first = lbfgs.LBFGS(np.zeros(40), tol=1e-9, history=4)
    while first.evaluations < 37 or first.phase != "zoom":  # mid line search, the memory wrapped
        first.tell(*evaluate(first.point()))
    arrays, numbers = first.state_dict()
    second = lbfgs.LBFGS(np.ones(40), tol=1e-9, history=4)
    second.load_state_dict({k: v.copy() for k, v in arrays.items()}, numbers)
    minimise(first, evaluate)
    minimise(second, evaluate)
    assert first.evaluations == second.evaluations and np.array_equal(first.x, second.x)


# --- the objective -----------------------------------------------------------------------------------------

def test_the_objective_and_its_gradient_with_smoothing_a_penalised_bias_and_centred_coordinates():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 6)) + 3.0, rng.integers(0, 4, 50)
    eye = np.eye(28) * 1e-6
    for smoothing, decay_bias, mean in ((0.0, False, None), (0.2, True, None), (0.1, True, x.mean(0)),
                                        (0.0, False, x.mean(0))):
        obj = Objective(50, 4, 6, [0.01], [smoothing], decay_bias, mean=mean)
        plain = Objective(50, 4, 6, [0.01], [smoothing], decay_bias)

        def evaluate(o, p):
            return o.totals(p, np.array([0]), o.local_sums(p, np.array([0]), [(x, y)]))

        point = rng.standard_normal((1, obj.size))
        _, f, grad = evaluate(obj, point)
        numeric = np.array([(evaluate(obj, point + e)[1][0] - evaluate(obj, point - e)[1][0]) / 2e-6 for e in eye])
        assert np.abs(grad[0] - numeric).max() < 1e-7, (smoothing, decay_bias, mean is not None)
        # the same function of (W, b), whatever the coordinates; the reported norm is by (W, b)
        original = obj.original(point)
        assert f[0] == pytest.approx(evaluate(plain, original)[1][0], rel=1e-12)
        assert obj.gradient_norm(grad[0]) == pytest.approx(np.linalg.norm(evaluate(plain, original)[2][0]), rel=1e-9)
        w, b = original[0, :24].reshape(4, 6), original[0, 24:]
        logp = x @ w.T + b
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        target = (1 - smoothing) * np.eye(4)[y] + smoothing / 4
        penalty = (w ** 2).sum() + (b @ b if decay_bias else 0.0)
        assert f[0] == pytest.approx(-(target * logp).sum(1).mean() + 0.005 * penalty, rel=1e-12)


def test_fixed_point_sums_are_the_same_bits_however_the_blocks_are_dealt():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((230, 8)) * 3, rng.integers(0, 3, 230)
    obj = Objective(230, 3, 8, [1e-3, 1e-4], [0.0, 0.1], False)
    points, heads = rng.standard_normal((2, obj.size)), np.arange(2)
    exponents = obj.exponents(points, float(np.abs(x).max()))
    blocks = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 230, 16)]
    totals = []
    for size in (1, 2, 3, 4):  # rank r holds blocks r, r + size, ...
        words = sum(obj.local_sums(points, heads, blocks[r::size], exponents) for r in range(size))
        totals.append(obj.from_fixed(words, exponents))
    assert all(np.array_equal(totals[0], t) for t in totals[1:])
    assert np.abs(totals[0] - obj.local_sums(points, heads, blocks)).max() < 1e-9


# --- against scikit-learn, on features extracted here ---------------------------------------------------

def extract(pretrained, role):
    """resnet18_v2's frozen features of the demo digits, by plain Gluon."""
    from mxnet.gluon.model_zoo import vision

    net = vision.resnet18_v2(classes=5)
    net.load_parameters(pretrained)
    images = dataset("demo", role)
    transform = Transform(32, IMAGENET_MEAN, IMAGENET_STD, False, 0)
    batch = np.stack([transform(images.read(i), 0, i) for i in range(len(images))])
    return net.features(mx.nd.array(batch)).asnumpy().astype(np.float64), images.labels


def objective_at(x, y, weight, bias, wd):
    logits = x @ weight.T + bias
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * wd * (weight ** 2).sum()


def test_the_solved_head_is_scikit_learns_logistic_regression_with_c_1_over_wd_n(tmp_path, pretrained, capsys):
    """The reference: LogisticRegression(C = 1 / (wd N)) solved by newton-cg on the centred
    features, its intercept taken back (the same objective, the bias unpenalised). On these
    features (a backbone pretrained for 2 epochs: |x| up to ~300) scikit-learn's default
    lbfgs stops at max_iter far from the optimum (measured: 20,000 evaluations, objective
    0.3% above it at wd 1e-3)."""
    from sklearn.linear_model import LogisticRegression

    x, y = extract(pretrained, "train")
    x_val, y_val = extract(pretrained, "val")
    grid = [1e-2, 1e-3]
    doc = small_config(tmp_path, pretrained, data={"val": "demo", "batch_size": 64},
                       optimizer={"name": "lbfgs", "tol": 1e-6},
                       train={"epochs": 3000, "max_steps": None, "log_every": 500},
                       heads={"grid": {"optimizer.weight_decay": grid}})
    summary = run(load_config(write_config(tmp_path / "c.yaml", doc)), LocalWorld())
    assert summary["solver"]["samples"] == len(y) and summary["passes"] < 3000
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[distft] pass ")]
    assert lines and not [line for line in lines if re.search(r"\d\.\d{5,}", line)], lines
    mean = x.mean(axis=0)
    for wd, head in zip(grid, summary["heads"]):
        ref = LogisticRegression(C=1.0 / (wd * len(y)), solver="newton-cg", tol=1e-10, max_iter=1000).fit(x - mean, y)
        weight, bias = ref.coef_, ref.intercept_ - ref.coef_ @ mean
        theirs = objective_at(x, y, weight, bias, wd)
        assert head["objective"] == pytest.approx(theirs, rel=1e-4), wd
        assert abs(head["val_top1"] - ((x_val @ weight.T + bias).argmax(1) == y_val).mean()) <= 0.005, wd
        ours = load_params(tmp_path / "out" / "heads" / head["name"] / "model.params")
        assert objective_at(x, y, ours["output.weight"], ours["output.bias"], wd) == pytest.approx(theirs, rel=1e-4)


def test_an_sgd_head_only_run_with_the_cache_reports_the_objective_and_gradient_norm_at_its_end(
        tmp_path, pretrained):
    x, y = extract(pretrained, "train")
    doc = small_config(tmp_path, pretrained, data={"batch_size": 64},
                       optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
                       train={"epochs": 2, "max_steps": None, "cache_features": True, "log_every": 100})
    s = run(load_config(write_config(tmp_path / "c.yaml", doc)), LocalWorld())
    w = load_params(tmp_path / "out" / "model.params")
    weight, bias = w["output.weight"].astype(np.float64), w["output.bias"].astype(np.float64)
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    grad = np.concatenate([(p.T @ x / len(y) + 1e-3 * weight).ravel(), p.mean(0)])
    assert s["objective"] == pytest.approx(objective_at(x, y, weight, bias, 1e-3), rel=1e-4)
    assert s["gradient_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-3)
    assert "passes" not in s and "solver" not in s
    assert s["feature_cache"]["hits"] + s["feature_cache"]["misses"] == s["steps"] * 64  # training's reads only


# --- every world size, and a stop --------------------------------------------------------------------

@pytest.mark.horovod
def test_one_two_and_four_ranks_and_a_stopped_solve_end_with_the_same_weights(tmp_path, pretrained):
    """1 rank in this process; 4 under mpirun (the sums through the MPI statistics channel);
    2 under horovodrun --gloo (through Horovod), stopped at a pass and resumed."""
    doc = small_config(tmp_path, pretrained, data={"val": "demo", "batch_size": 32},
                       optimizer={"name": "lbfgs", "tol": 1e-4},
                       train={"epochs": 400, "max_steps": None, "log_every": 100, "label_smoothing": 0.1},
                       heads={"grid": {"optimizer.weight_decay": [1e-3, 1e-4]}})

    def config(name):
        return write_config(tmp_path / f"{name}.yaml", {**doc, "train": {**doc["train"],
                                                                         "output": str(tmp_path / name)}})

    one = run(load_config(config("one")), LocalWorld())
    mpirun = shutil.which("mpirun")
    proc = run_cli(["--config", config("four")], launcher=[mpirun, "-np", "4", "--oversubscribe"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stopped = config("two")
    proc = run_cli(["--config", stopped], launcher=horovodrun(2, "gloo"), env={"DISTFT_FAULT_STOP_AT_STEP": "20@1"})
    assert "preempted (SIGTERM) at step 21; checkpoint written" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    proc = run_cli(["--config", stopped], launcher=horovodrun(2, "gloo"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two, four = read_summary(tmp_path / "two"), read_summary(tmp_path / "four")
    assert (four["solver"]["channel"], two["solver"]["channel"], one["solver"]["channel"]) == ("mpi", "horovod", "local")
    assert one["passes"] == two["passes"] == four["passes"] and two["resumed"]
    assert one["objective"] == two["objective"] == four["objective"]
    for head in ("h0", "h1"):
        reference = load_params(tmp_path / "one" / "heads" / head / "model.params")
        for other in ("two", "four"):
            weights = load_params(tmp_path / other / "heads" / head / "model.params")
            assert max(float(np.abs(reference[n] - weights[n]).max()) for n in reference) <= 1e-5, (head, other)


# --- plans it refuses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.augment=true"], "optimizer.name: lbfgs solves the head on fixed features, and data.augment: true "
                            "changes them every epoch (set data.augment: false, or use sgd)"),
    (["freeze.schedule=[{epoch: 1, unfreeze: [features.8]}]", "train.epochs=5"],
     "optimizer.name: lbfgs trains the head alone, and freeze.schedule unfreezes blocks (remove it, or use sgd)"),
    (["heads.grid={optimizer.lr: [0.1, 0.01]}", "data.val_split=0.2"],
     "heads.grid.optimizer.lr: optimizer.name: lbfgs has no lr; its heads may vary optimizer.weight_decay and "
     "train.label_smoothing"),
    (["optimizer.history=lots"], "optimizer.history: expected an integer or auto, got 'lots'"),
])
def test_what_the_config_says_is_refused_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimizer.name=lbfgs", *overrides])
    assert str(err.value) == message


def test_a_plan_with_trainable_blocks_is_refused_naming_optimizer_name(tmp_path, pretrained):
    doc = small_config(tmp_path, pretrained, freeze={"trainable": ["features.8", "output"]},
                       optimizer={"name": "lbfgs"})
    with pytest.raises(ConfigError) as err:
        run(load_config(write_config(tmp_path / "c.yaml", doc)), LocalWorld())
    assert str(err.value) == ("optimizer.name: lbfgs trains a linear head alone on frozen features "
                              "(freeze.trainable: [output]); the plan also trains features.8")


def test_a_head_that_is_not_one_affine_map_is_named():
    net = nn.HybridSequential()
    net.add(nn.Dense(4, activation="relu"), nn.Dense(3, flatten=False))
    net.output = nn.HybridSequential()
    assert model.linear_head_problem(net, "0") == "0 has an activation"
    assert model.linear_head_problem(net, "1") == "1 is a Dense layer with flatten=False"
    assert model.linear_head_problem(net, "output") == "output is a HybridSequential, not one Dense layer"
