"""One converted model for the serving and C tests.

A user arrives with files exported from a Gluon network that uses MXNet's
built-in ``nn.InstanceNorm``. :func:`converted_model` writes such files
(``native-symbol.json``, ``native-0000.params``) and the converted model
(``model-symbol.json``, ``model-0000.params``) that the serving and C tests
deploy, and returns the built-in network's own output as the independent
reference.

The conversion is what a user with only the files does:
``mx_instnorm.from_native`` on ``native-symbol.json``, on the backend in use
(``MX_INSTNORM_BACKEND``); the parameter file is the original one (the
names stay the same), copied under the converted model's prefix.
"""
import os
import shutil

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

import mx_instnorm

INPUT_SHAPE = (2, 3, 12, 10)


def _network():
    net = nn.HybridSequential(prefix="gen_")
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, in_channels=3),
                nn.InstanceNorm(in_channels=8, scale=True),
                nn.Activation("relu"),
                nn.Conv2D(6, 3, padding=1, in_channels=8),
                # Channels last: the built-in exports SwapAxis around it.
                nn.InstanceNorm(axis=-1, in_channels=10, epsilon=1e-5),
                nn.Conv2D(4, 1, in_channels=6))
    return net


def converted_model(directory, seed=0):
    """Write the native and the converted model into ``directory``.

    Returns
    -------
    dict
        ``symbol``, ``params``: the converted model's files; ``native_symbol``,
        ``native_params``: the built-in one's; ``x``: a float32 input of
        :data:`INPUT_SHAPE`; ``native_y``: the built-in network's output for
        ``x`` (float32, computed by MXNet's own InstanceNorm).
    """
    rng = np.random.RandomState(seed)
    net = _network()
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros(INPUT_SHAPE))
    for name, param in net.collect_params().items():
        # Non-trivial gamma/beta: the defaults (1, 0) hide mistakes.
        param.set_data(mx.nd.array(rng.uniform(-1.0, 1.0, param.shape)))
    x = rng.standard_normal(INPUT_SHAPE).astype(np.float32) * 2.0 + 0.5
    net.hybridize(static_alloc=True)
    native_y = net(mx.nd.array(x)).asnumpy()
    native = os.path.join(directory, "native")
    net.export(native)

    model = os.path.join(directory, "model")
    mx_instnorm.from_native(native + "-symbol.json").save(model + "-symbol.json")
    shutil.copyfile(native + "-0000.params", model + "-0000.params")
    return dict(symbol=model + "-symbol.json", params=model + "-0000.params",
                native_symbol=native + "-symbol.json",
                native_params=native + "-0000.params", x=x, native_y=native_y)
