"""Synchronized BatchNorm pieces that need no second rank."""
import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

from distft.distributed import syncbn
from distft.distributed.world import LocalWorld


def test_running_variance_folds_in_the_estimator_mxnets_own_batchnorm_uses_on_this_device():
    """MXNet's CPU BatchNorm (and oneDNN's) folds the biased batch variance into its running
    variance; cuDNN folds the unbiased one. The synchronized layer must do what the local one
    does on the same device, or `dist.batchnorm: sync` and `local` would drift apart."""
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (6, 4, 3, 3)).astype(np.float32)
    bn = nn.BatchNorm(in_channels=4, momentum=0.5)
    bn.initialize()
    with autograd.record():
        y = bn(mx.nd.array(x))
    y.backward()  # MXNet's CPU kernel moves the running statistics in backward
    n = x.size // 4
    biased = x.var(axis=(0, 2, 3))
    mxnet_sample = (bn.running_var.data().asnumpy() - 0.5 * 1.0) / 0.5  # running_var started at 1
    np.testing.assert_allclose(mxnet_sample, biased, rtol=1e-4)
    assert not np.allclose(mxnet_sample, biased * n / (n - 1), rtol=1e-4)  # the test can tell them apart

    np.testing.assert_allclose(syncbn.running_var_sample(biased, float(n), "cpu"), biased, rtol=1e-6)
    np.testing.assert_allclose(syncbn.running_var_sample(biased, float(n), "gpu"), biased * n / (n - 1), rtol=1e-6)


def _two_passes(bn, batches, grad_req):
    for p in (bn.gamma, bn.beta):
        p.grad_req = grad_req
    grads = []
    for x, w in batches:
        x = mx.nd.array(x)
        x.attach_grad()
        with autograd.record():
            loss = (bn(x) * mx.nd.array(w)).sum()
        loss.backward()
        grads.append(x.grad.asnumpy())
    return grads, bn.gamma.grad().asnumpy(), bn.beta.grad().asnumpy()


def test_gamma_and_beta_gradients_accumulate_over_micro_batches_as_mxnets_batchnorm_does():
    """With micro-batches the trainer sets grad_req 'add'. MXNet 1.9.1's autograd.Function writes
    nothing for an input whose request is 'add' (and nothing after one whose request is 'null'):
    the synchronized layer's gamma/beta gradients were dropped once. One process: the exchange
    is the identity, so the layer must match MXNet's BatchNorm exactly."""
    rng = np.random.default_rng(5)
    batches = [(rng.normal(1.0, 2.0, (4, 3, 2, 2)).astype(np.float32),
                rng.normal(0, 1, (4, 3, 2, 2)).astype(np.float32)) for _ in range(2)]
    for grad_req in ("add", "write"):
        nets = []
        for _ in range(2):
            net = nn.HybridSequential()
            net.add(nn.BatchNorm(in_channels=3))
            net.initialize()
            net[0].gamma.set_data(mx.nd.array([0.5, 1.5, 2.0]))
            nets.append(net)
        assert syncbn.convert(nets[1], ["0"], LocalWorld().bn_exchanges()) == 1
        plain, synced = nets[0][0], nets[1][0]
        want, got = _two_passes(plain, batches, grad_req), _two_passes(synced, batches, grad_req)
        for a, b in zip(got[0], want[0]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5, err_msg=f"gamma, {grad_req}")
        np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-5, err_msg=f"beta, {grad_req}")
        assert np.abs(got[1]).sum() > 0 and np.abs(got[2]).sum() > 0


def test_statistics_keep_their_precision_when_the_batch_mean_is_far_from_the_running_mean():
    """The exchanged statistics are moments about the running mean. A batch far from it (here a
    channel at 10 with spread 0.01, running mean 0: a fresh layer, or a new data set) made
    float32 cancel in E[(x-s)^2] - E[x-s]^2: the variance came out 3% off. One process: the
    exchange is the identity, so the layer must normalise as MXNet's own BatchNorm does."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(10.0, 0.01, (8, 1, 3, 3)), rng.normal(-300.0, 0.5, (8, 1, 3, 3)),
                        rng.normal(0.0, 1.0, (8, 1, 3, 3))], axis=1).astype(np.float32)
    outs = []
    for sync in (False, True):
        net = nn.HybridSequential()
        net.add(nn.BatchNorm(in_channels=3))
        net.initialize()
        if sync:
            syncbn.convert(net, ["0"], LocalWorld().bn_exchanges())
        with mx.autograd.record():
            y = net(mx.nd.array(x))
        outs.append(y.asnumpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3)
    # the running statistics it folds in (MXNet's CPU kernel folds its own only in backward):
    # momentum 0.9, the biased variance on CPU
    stats = x.astype(np.float64)
    np.testing.assert_allclose(net[0].running_mean.data().asnumpy(), 0.1 * stats.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(net[0].running_var.data().asnumpy(), 0.9 + 0.1 * stats.var(axis=(0, 2, 3)), rtol=1e-5)
