"""Run under horovodrun -np 2: a synchronized BatchNorm over each rank's half of a batch.
Rank 0 writes what every rank computed, for the test to compare with one BN over the union."""
import sys

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

from distft.models import gluon
from distft.distributed import syncbn
from distft.distributed.world import init_world

out_path = sys.argv[1]
channel = sys.argv[2] if len(sys.argv) > 2 else "auto"
world = init_world()
rng = np.random.default_rng(0)
x_full = rng.normal(1.5, 2.0, (8, 4, 5, 5)).astype(np.float32)
w_full = rng.normal(0, 1, (8, 4, 5, 5)).astype(np.float32)  # loss = sum(y * w)
gamma = rng.uniform(0.5, 1.5, 4).astype(np.float32)
beta = rng.normal(0, 0.5, 4).astype(np.float32)
half = slice(4 * world.rank, 4 * world.rank + 4)

net = nn.HybridSequential()
net.add(nn.BatchNorm(in_channels=4, momentum=0.8))
net.initialize()
net[0].gamma.set_data(mx.nd.array(gamma))
net[0].beta.set_data(mx.nd.array(beta))
assert syncbn.convert(net, ["0"], world.bn_exchanges(channel)) == 1
gluon.hybridize_except(net, syncbn.is_sync)  # as training does: the sync BN stays imperative
x = mx.nd.array(x_full[half])
x.attach_grad()
with autograd.record():
    y = net(x)
    loss = (y * mx.nd.array(w_full[half])).sum()
loss.backward()
local = np.concatenate([y.asnumpy().ravel(), x.grad.asnumpy().ravel(),
                        net[0].gamma.grad().asnumpy(), net[0].beta.grad().asnumpy(),
                        net[0].running_mean.data().asnumpy(), net[0].running_var.data().asnumpy()])
gathered = hvd.allgather(mx.nd.array(local[None, :])).asnumpy()
if world.rank == 0:
    np.save(out_path, gathered)
