"""One of the two processes of ``tests/test_multihost.py``.

Run as ``python tests/_multihost_worker.py PROCESS_ID PORT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the two processes join
through ``jax.distributed.initialize`` on 127.0.0.1, make one mesh over the
four CPU devices, run the three cases below on global arrays, gather the
results to the host and save them as ``OUT_DIR/process_<id>.npz``. The test
imports the data and loss functions from here for its single-process
reference.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src import distributed, xla_bridge
from jax._src.lib import _jax
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxent

PROCESSES = 2
N, D, C = 16, 8, 32  # tokens (examples), hidden width, classes
IGNORE = -100
HOST = "127.0.0.1"  # everything listens on loopback only
STEPS = 3
OPTIMIZER = optax.sgd(0.5, momentum=0.9)


def inputs():
    """The same float32 data in every process (fixed seed). The ignored labels
    all lie in the first half of the batch, which process 0 loads in case 3:
    the processes count differently, so a mean of their means would be wrong."""
    rng = np.random.default_rng(0)

    def labels():
        y = rng.integers(0, C, N).astype(np.int32)
        y[[1, 4, 6]] = IGNORE
        return y

    def normal(*shape, scale=1.0):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    return {
        "h": normal(N, D),
        "w": normal(D, C, scale=D**-0.5),
        "y": labels(),
        "x": normal(N, C, scale=3.0),
        "x_labels": rng.integers(0, C, N).astype(np.int32),
        "params": {"w": normal(D, C, scale=0.1), "b": normal(C, scale=0.1)},
        "batches": [(normal(N, D), labels()) for _ in range(STEPS)],
    }


def count(y):
    return jnp.sum(y != IGNORE).astype(jnp.float32)


def linear_sum(h, w, y, axis_name=None):
    """Case 1's loss before the division by the count."""
    return jaxent.linear_softmax_cross_entropy(
        h, w, y, ignore_index=IGNORE, reduction="sum", axis_name=axis_name
    )


def ce_mean(x, y):
    """Case 2's loss."""
    return jaxent.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")


def classifier_loss(params, f, y):
    logits = f @ params["w"] + params["b"]
    return jaxent.softmax_cross_entropy_with_integer_labels(
        logits, y, ignore_index=IGNORE, reduction="mean"
    )


@jax.jit
def train_step(params, opt_state, f, y):
    loss, grads = jax.value_and_grad(classifier_loss)(params, f, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(params, batches):
    """Case 3: parameters and losses after ``STEPS`` optax steps."""
    opt_state = OPTIMIZER.init(params)
    losses = []
    for f, y in batches:
        params, opt_state, loss = train_step(params, opt_state, f, y)
        losses.append(loss)
    return params, jnp.stack(losses)


def diagonal_mesh():
    """A 2 x 2 ("data", "model") mesh whose rows and columns both pair a device
    of each process: every collective of case 1 crosses the process boundary."""
    (a0, a1), (b0, b1) = (
        [d for d in jax.devices() if d.process_index == p] for p in range(PROCESSES)
    )
    return Mesh(np.array([[a0, b0], [b1, a1]]), ("data", "model"))


def vocab_parallel(data):
    """Case 1: the shard_map example of docs/scaling.md, weight split over
    "model"."""
    mesh = diagonal_mesh()

    def per_shard(h, w, y):  # w: [D, C / 2], this shard's classes
        total = jax.lax.psum(linear_sum(h, w, y, "model"), "data")
        return total / jax.lax.psum(count(y), "data")

    specs = (P("data"), P(None, "model"), P("data"))
    loss = jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=P())
    h, w, y = (
        jax.make_array_from_callback(a.shape, NamedSharding(mesh, s), a.__getitem__)
        for a, s in zip((data["h"], data["w"], data["y"]), specs, strict=True)
    )
    value, (dh, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w, y)
    assert not dw.is_fully_addressable  # each process holds half of d weight
    return {"vp_value": value, "vp_dh": dh, "vp_dw": dw}


def local_rows(a):
    """This process's contiguous share of the batch, as a data loader gives it."""
    rows = len(a) // PROCESSES
    return a[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def sharded_jit(data):
    """Case 2: jit on logits split over both axes of the global mesh."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), (AxisType.Auto,) * 2)
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data", "model")), local_rows(data["x"]), (N, C)
    )
    y = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), local_rows(data["x_labels"]), (N,)
    )
    value, dx = jax.jit(jax.value_and_grad(ce_mean))(x, y)
    return {"jit_value": value, "jit_dx": dx}


def data_parallel(data):
    """Case 3: the batch split over all four devices, parameters replicated."""
    mesh = jax.make_mesh((4,), ("batch",), (AxisType.Auto,))
    rows = NamedSharding(mesh, P("batch"))
    batches = [
        (
            jax.make_array_from_process_local_data(rows, local_rows(f), (N, D)),
            jax.make_array_from_process_local_data(rows, local_rows(y), (N,)),
        )
        for f, y in data["batches"]
    ]
    params = jax.device_put(data["params"], NamedSharding(mesh, P()))
    params, losses = train(params, batches)
    return {"dp_w": params["w"], "dp_b": params["b"], "dp_losses": losses}


def bind_gloo_to_loopback():
    """Makes the CPU client's gloo collectives listen on 127.0.0.1. JAX's own
    factory leaves gloo's address to the machine's hostname, which may resolve
    to an outside interface, or to nothing on some CI machines; JAX has no
    public setting for it, hence the private hooks. Call it before the first
    use of the devices."""

    def cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed.global_state.client, hostname=HOST
        )
        return xla_bridge.make_cpu_client(collectives)

    xla_bridge.register_backend_factory("cpu", cpu_client, fail_quietly=False)


def main(process_id, port, out_dir):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"{HOST}:{port}"
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=PROCESSES,
        process_id=process_id,
        # The default binds the coordinator on every interface ([::]).
        coordinator_bind_address=address,
        initialization_timeout=30,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    bind_gloo_to_loopback()
    assert (jax.process_count(), jax.device_count()) == (PROCESSES, 4)
    data = inputs()
    results = {**vocab_parallel(data), **sharded_jit(data), **data_parallel(data)}
    results = process_allgather(results, tiled=True)
    np.savez(Path(out_dir) / f"process_{process_id}.npz", **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
