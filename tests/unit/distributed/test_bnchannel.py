"""The statistics channel and the order of synchronized BN exchanges, in one process."""
import random
import threading
import types

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

from distft.distributed import bnchannel
from distft.distributed import syncbn
from distft.distributed.bnexchange import Exchanges
from distft.errors import ConfigError


class Recording:
    """A channel that sums nothing and records what it was given, in order."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def allreduce(self, values, direction, key):
        self.calls.append((direction, key, values.copy()))
        return values


def test_backward_exchanges_go_in_reverse_forward_order_per_pass_whatever_order_threads_bring_them():
    """Backward callbacks run on MXNet's custom-operator threads as each layer's gradient is
    ready: their order differs between ranks (micro-batches, heads, parallel branches). A
    collective must be entered in one order everywhere: pass after pass, each in reverse
    forward order. A pass ends where a layer shows up again."""
    channel = Recording()
    ex = Exchanges(channel)
    layers = ["a", "b", "c"]
    slots = []
    for p in range(3):  # three passes (micro-batches or steps) registered before any backward
        for key in layers:
            _, where = ex.forward(key, np.array([float(p)]), backward=True)
            slots.append((p, key, where))
    forward_calls = len(channel.calls)
    order = list(slots)
    random.Random(4).shuffle(order)
    results = {}

    def callback(p, key, where):
        results[(p, key)] = ex.backward(where, np.array([10.0 * p + layers.index(key)]))

    threads = [threading.Thread(target=callback, args=s) for s in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "an exchange waited forever"
    got = [(c[1], float(c[2][0])) for c in channel.calls[forward_calls:]]
    want = [(key, 10.0 * p + layers.index(key)) for p in range(3) for key in reversed(layers)]
    assert got == want
    assert all(c[0] == "backward" for c in channel.calls[forward_calls:])
    assert results[(2, "b")][0] == 21.0


def test_a_slot_carries_every_head_of_a_layer_in_one_exchange_and_hands_each_its_part():
    channel = Recording()
    ex = Exchanges(channel)
    slot = ex.expect("bn", 3)
    out = {}

    def callback(head):
        out[head] = ex.backward((slot, head), np.full(2, float(head)))

    threads = [threading.Thread(target=callback, args=(h,)) for h in (2, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(channel.calls) == 1
    np.testing.assert_array_equal(channel.calls[0][2], [0, 0, 1, 1, 2, 2])
    assert [out[h].tolist() for h in range(3)] == [[0, 0], [1, 1], [2, 2]]


def _bn_conv_bn(channel):
    net = nn.HybridSequential()
    net.add(nn.BatchNorm(in_channels=4), nn.Conv2D(4, 1, in_channels=4), nn.BatchNorm(in_channels=4))
    net.initialize()
    assert syncbn.convert(net, ["0", "2"], Exchanges(channel)) == 2
    return net


@pytest.mark.parametrize("input_grad", [False, True])
def test_the_first_synchronized_bn_after_a_frozen_prefix_makes_no_backward_exchange(input_grad):
    """The first trainable BN's input (the frozen prefix's output) needs no gradient, so its
    backward needs no global sums: one exchange fewer per step. With an input gradient asked
    for, it makes one."""
    channel = Recording()
    net = _bn_conv_bn(channel)
    x = mx.nd.random.normal(shape=(2, 4, 3, 3))
    if input_grad:
        x.attach_grad()
    w = mx.nd.random.normal(shape=x.shape)
    with autograd.record():
        loss = (net(x) * w).sum()
    loss.backward()
    net[0].gamma.grad().wait_to_read()
    directions = [c[0] for c in channel.calls]
    assert directions.count("forward") == 2
    assert directions.count("backward") == (2 if input_grad else 1)
    assert np.abs(net[0].gamma.grad().asnumpy()).sum() > 0  # its gamma/beta gradients still come


def test_mpi_channel_without_mpi_is_one_line_naming_the_key():
    gloo = types.SimpleNamespace(size=2, mpi_comm=None, hvd=None)
    with pytest.raises(ConfigError) as err:
        bnchannel.open_channel("mpi", gloo)
    assert str(err.value).startswith("dist.bn_channel: mpi needs an MPI launcher")
    assert "\n" not in str(err.value)
    assert bnchannel.open_channel("auto", gloo).name == "horovod"
    assert bnchannel.open_channel("mpi", types.SimpleNamespace(size=1)).name == "local"


def test_staging_moves_a_layers_values_through_the_host_and_back_as_new_arrays():
    """A layer's 2C values cross the host whatever its device (a GPU array the same way: to_host
    waits for its kernel and copies; to_device makes a new array on that device)."""
    values = mx.nd.array(np.linspace(-3, 3, 8), dtype="float32")
    (host,) = bnchannel.to_host(values)
    assert host.dtype == np.float64 and np.allclose(host, np.linspace(-3, 3, 8))
    host[0] = 99.0  # a copy: the device array is untouched
    assert values.asnumpy()[0] == -3.0
    back, again = bnchannel.to_device(host, mx.cpu()), bnchannel.to_device(host, mx.cpu())
    assert back.context == mx.cpu() and back.dtype == np.float32
    np.testing.assert_allclose(back.asnumpy(), host.astype(np.float32))
    back[1] = 5.0  # never the same array twice: a backward reads what no later forward writes
    assert again.asnumpy()[1] != 5.0
    target = mx.nd.zeros(8)
    bnchannel.copy_into(target, host)
    np.testing.assert_allclose(target.asnumpy(), host.astype(np.float32))
