"""Train the byte-level LM of ``train_char_lm.py`` on a 2 x 4 mesh of 8 CPU devices.

The mesh has a ``data`` axis (2 shards of the batch) and a ``model`` axis (4
shards of the output head's vocabulary). The same training step runs four ways,
from the same initial parameters and batches, and their losses are printed side
by side:

* ``one device``: plain ``jax.jit``, the reference;
* ``auto``: ``jax.jit`` on arrays placed with ``NamedSharding`` on an
  ``AxisType.Auto`` mesh (XLA's automatic partitioning; the code is unchanged);
* ``explicit``: the same step under ``jax.set_mesh`` on an ``AxisType.Explicit``
  mesh (shardings are part of the array types);
* ``shard_map``: written per shard. The trunk runs data-parallel; the head is
  vocab-parallel: ``jaxent.linear_softmax_cross_entropy(..., axis_name="model")``
  sees a ``[D, 256 / 4]`` slice of the head weight and all-reduces only per-token
  statistics (max, sum-exp, target logit) and ``d hidden``. The mean over the
  global batch is the psum of per-shard sums divided by the psum of counts.

Usage::

    python examples/train_sharded.py              # 30 steps, about a minute
    python examples/train_sharded.py --quick      # 10 steps, a CI smoke test

The 8 devices are host (CPU) devices made by ``XLA_FLAGS``, set below before
JAX starts. The script exits with status 1 if any sharded run's loss drifts
from the one-device loss by more than float32 rounding allows.
"""

import argparse
import os
import re
import sys
import time
from contextlib import nullcontext

# Must precede the first `import jax`: the device count is fixed at start-up.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _char_lm import (
    BLOCK_SIZE,
    QUICK,
    VOCAB,
    init_params,
    load_corpus,
    make_step,
    sample_batch,
    trunk,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import jaxent

MESH_SHAPE = (2, 4)  # (data, model)
# Loss agreement demanded of the sharded runs: float32 rounding of sums taken
# in another order, grown a little by a few optimizer steps.
TOLERANCE = 1e-4


def features(params, tokens, heads):
    """``_char_lm.features`` with the byte embedding taken as a one-hot
    matmul: indexing a replicated table with batch-sharded ids is a gather
    whose output sharding an explicit mesh asks the caller to spell out."""
    onehot = jax.nn.one_hot(tokens, VOCAB, dtype=params["embed"].dtype)
    x = onehot @ params["embed"] + params["pos"][: tokens.shape[1]]
    return trunk(params, x, heads)


def loss_fn(params, batch, heads):
    """Mean next-byte cross-entropy through the fused head (one program for
    one device and for both automatic modes)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    return jaxent.linear_softmax_cross_entropy(
        features(params, inputs, heads),
        params["head_w"],
        targets,
        bias=params["head_b"],
        reduction="mean",
        block_size=BLOCK_SIZE,
    )


def param_specs(params):
    """Replicated trunk; the head's columns (the vocabulary) split over model."""
    specs = jax.tree.map(lambda _: P(), params)
    specs["head_w"], specs["head_b"] = P(None, "model"), P("model")
    return specs


def shard_map_loss(mesh, params, heads):
    """The mean next-byte loss written per shard (see the module docstring)."""

    def per_shard(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        h = features(params, inputs, heads)
        total = jaxent.linear_softmax_cross_entropy(
            h,
            params["head_w"],  # [D, 64]: this shard's vocabulary columns
            targets,
            bias=params["head_b"],
            reduction="sum",
            block_size=BLOCK_SIZE,
            axis_name="model",
        )
        count = jnp.asarray(targets.size, total.dtype)
        return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")

    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(param_specs(params), P("data")),
        out_specs=P(),
    )


def place(mesh, params, optimizer, batches):
    """The parameters (``param_specs``), a fresh optimizer state and the batches
    (split over ``data``) on ``mesh``."""
    specs = param_specs(params)
    params = jax.tree.map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs
    )
    # Made under the mesh, the state's step count (a scalar) is replicated on
    # it, as the step returns it; made on one device, it would make the step's
    # second call compile again for the new sharding.
    with jax.set_mesh(mesh):
        opt_state = optimizer.init(params)
    batches = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in batches]
    return params, opt_state, batches


def collectives(step, *args):
    """Collectives of a compiled step: {op: sorted distinct operand shapes}."""
    # Long tuples carry /*index=k*/ comments, whose "=" would end a match.
    text = re.sub(r"/\*.*?\*/", "", step.lower(*args).compile().as_text())
    found = {}
    pattern = r"= (\(?[^=]*?\)?) (all-reduce|all-gather|all-to-all)(?:-start)?\("
    for shapes, op in re.findall(pattern, text):
        found.setdefault(op, set()).update(
            re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", shapes)
        )
    return {
        op: sorted(shapes, key=lambda s: (len(s), s)) for op, shapes in found.items()
    }


def run(name, step, params, opt_state, batches, context):
    losses = []
    # disable=None: no bar where stderr is not a terminal (logs, CI).
    progress = tqdm(batches, desc=f"{name:>10}", unit="step", disable=None)
    with context, progress:
        for batch in progress:
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return name, losses


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, for CI")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    steps = args.steps or (10 if args.quick else 30)
    cfg = dict(QUICK, context=40)
    heads = cfg["heads"]
    start = time.perf_counter()
    if jax.device_count() < 8:
        print(f"need 8 devices, got {jax.device_count()}", file=sys.stderr)
        return 1

    data = load_corpus(cfg["corpus_mib"] * 2**20)
    rng = np.random.default_rng(args.seed)
    batches = [
        np.asarray(sample_batch(rng, data, args.batch_size, cfg["context"]))
        for _ in range(steps)
    ]
    params = init_params(jax.random.key(args.seed), cfg)
    optimizer = optax.adam(3e-3)

    def loss(params, batch):
        return loss_fn(params, batch, heads)

    plain = make_step(optimizer, loss)
    results = [
        run("one device", plain, params, optimizer.init(params), batches, nullcontext())
    ]

    auto = jax.make_mesh(MESH_SHAPE, ("data", "model"), (AxisType.Auto,) * 2)
    state = place(auto, params, optimizer, batches)
    results.append(run("auto", plain, *state, nullcontext()))

    explicit = jax.make_mesh(MESH_SHAPE, ("data", "model"), (AxisType.Explicit,) * 2)
    state = place(explicit, params, optimizer, batches)
    results.append(run("explicit", plain, *state, jax.set_mesh(explicit)))

    manual = make_step(optimizer, shard_map_loss(auto, params, heads))
    p, opt_state, b = place(auto, params, optimizer, batches)
    results.append(run("shard_map", manual, p, opt_state, b, nullcontext()))

    print(
        f"byte-level LM, width {cfg['width']}, {cfg['layers']} layers, batch "
        f"{args.batch_size} x {cfg['context']} bytes; mesh data=2 x model=4 "
        f"({jax.device_count()} CPU devices)"
    )
    print("step " + "".join(f"{name:>13}" for name, _ in results) + "   max |diff|")
    worst = 0.0
    for i in range(steps):
        row = [losses[i] for _, losses in results]
        diff = max(abs(v - row[0]) for v in row[1:])
        worst = max(worst, diff)
        print(f"{i + 1:4d} " + "".join(f"{v:13.6f}" for v in row) + f"   {diff:.1e}")

    tokens = args.batch_size // MESH_SHAPE[0] * cfg["context"]
    print(
        f"collectives in the shard_map step, {tokens} tokens per data shard:\n"
        f"  [{tokens}] the head's per-token statistics, [{tokens},{cfg['width']}] "
        "its d hidden;\n  parameter-shaped: the data-parallel gradient sums"
    )
    for op, shapes in collectives(manual, p, opt_state, b[0]).items():
        print(f"    {op}: {' '.join(shapes)}")
    print(f"time {time.perf_counter() - start:.1f} s")
    if worst > TOLERANCE:
        print(f"FAIL: a sharded loss differs by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
