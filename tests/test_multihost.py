"""jaxent across two processes joined by ``jax.distributed.initialize``, as on
two hosts: two CPU devices per process, gloo collectives, one mesh over the
four devices. ``tests/_multihost_worker.py`` runs in both processes; the
numbers of each must equal those of this single process:

1. vocab-parallel ``linear_softmax_cross_entropy`` inside ``jax.shard_map``
   (value, d hidden, d weight);
2. ``softmax_cross_entropy_with_integer_labels`` under ``jax.jit`` on logits
   sharded over both mesh axes (value and gradient of the mean);
3. three data-parallel optax steps of a linear classifier, each process
   loading its own half of the batch (parameters and losses).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _multihost_worker as worker

pytestmark = pytest.mark.slow

WORKER = Path(worker.__file__).absolute()
# The workers take 6 s on 2 idle cores, 15-30 s on busy ones; a failed peer
# must not hang CI, so past this both are killed.
TIMEOUT = 50
# float32 sums taken in another order (atol: gradient entries near 0).
RTOL, ATOL = 1e-5, 1e-7


def _free_port():
    with socket.socket() as s:
        s.bind((worker.HOST, 0))
        return s.getsockname()[1]


def _start_workers(out_dir):
    port = _free_port()
    flags = os.environ.get("XLA_FLAGS", "")
    # A proxy in the environment can catch gRPC's connection to the coordinator.
    env = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    procs = []
    for i in range(worker.PROCESSES):
        with open(out_dir / f"log_{i}.txt", "w") as log:
            cmd = [sys.executable, str(WORKER), str(i), str(port), str(out_dir)]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    return procs


def _wait(procs, out_dir, deadline):
    """Returns when both workers have exited with 0; fails as soon as one
    fails or the deadline passes (the caller kills the other)."""
    codes = [p.poll() for p in procs]
    while None in codes and set(codes) <= {None, 0} and time.monotonic() < deadline:
        time.sleep(0.1)
        codes = [p.poll() for p in procs]
    if codes != [0] * len(procs):
        logs = "".join(
            f"--- process {i}, exit code {c}:\n"
            + (out_dir / f"log_{i}.txt").read_text()[-3000:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"workers failed or ran past {TIMEOUT} s (None: running)\n{logs}")


def _single_process():
    """The three cases on one device, with the workers' data."""
    data = worker.inputs()
    h, w, y = (jnp.asarray(data[k]) for k in ("h", "w", "y"))

    def linear_mean(h, w):
        return worker.linear_sum(h, w, y) / worker.count(y)

    vp_value, (vp_dh, vp_dw) = jax.jit(jax.value_and_grad(linear_mean, (0, 1)))(h, w)
    jit_value, jit_dx = jax.jit(jax.value_and_grad(worker.ce_mean))(
        jnp.asarray(data["x"]), jnp.asarray(data["x_labels"])
    )
    params, losses = worker.train(
        jax.tree.map(jnp.asarray, data["params"]), data["batches"]
    )
    return {
        "vp_value": vp_value,
        "vp_dh": vp_dh,
        "vp_dw": vp_dw,
        "jit_value": jit_value,
        "jit_dx": jit_dx,
        "dp_w": params["w"],
        "dp_b": params["b"],
        "dp_losses": losses,
    }


@pytest.mark.first
def test_two_processes_match_one_process(tmp_path):
    deadline = time.monotonic() + TIMEOUT
    procs = _start_workers(tmp_path)
    try:
        expected = _single_process()  # while the workers start up
        _wait(procs, tmp_path, deadline)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for i in range(worker.PROCESSES):
        with np.load(tmp_path / f"process_{i}.npz") as got:
            assert set(got) == set(expected)
            for key, value in expected.items():
                np.testing.assert_allclose(
                    got[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{key} {i}"
                )

    # The check of case 3 has teeth: the processes count different numbers of
    # examples, so the mean of their two means is not the global mean.
    data = worker.inputs()
    f, y = data["batches"][0]
    params = jax.tree.map(jnp.asarray, data["params"])
    halves = [
        worker.classifier_loss(params, f[s], y[s])
        for s in np.split(np.arange(worker.N), 2)
    ]
    assert abs(float(np.mean(halves)) - float(expected["dp_losses"][0])) > 1e-3
