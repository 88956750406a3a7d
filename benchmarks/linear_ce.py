"""Fused linear + cross-entropy versus materialized logits: memory and time.

Prints three things:

1. The bars at N=2048, D=256, V=32768, float32, ``reduction="mean"`` with 10%
   ignored tokens: compiled temp memory of ``jax.value_and_grad`` w.r.t.
   ``(hidden, weight)`` (fused / naive, bar <= 10%) and forward+backward time
   (fused / naive, bar <= 1.25), plus fused time over the three bare matmuls
   ``h @ W``, ``g @ W.T``, ``h.T @ g`` (goal <= 1.2). Times are medians of
   interleaved runs after warm-up, all in this process.
2. A table of compiled temp memory versus V and N for both paths. It only
   compiles (``jax.ShapeDtypeStruct`` inputs), so shapes with 32 GB of logits
   are fine.
3. With ``--sweep``: forward+backward time and temp memory per tile shape
   ``(block_n, block_v)``, the measurements behind the default ``block_size``.

On a GPU (``--gpu``, the default there) the bars are taken at the language-model
shape N=8192, D=4096, V=128256 in bfloat16 (goal: fused <= 1.1x the three bare
matmuls, <= 64 MiB of temp memory beyond the naive path's), and ``--sweep``
times GPU-sized tiles.

The naive path is ``optax.softmax_cross_entropy_with_integer_labels(h @ W, y)``
with the ignored tokens masked out of the mean.

Usage::

    python benchmarks/linear_ce.py            # bars + scaling table (~2 min)
    python benchmarks/linear_ce.py --quick    # small shapes, a few seconds
    python benchmarks/linear_ce.py --sweep    # also the tile-shape sweep
    python benchmarks/linear_ce.py --gpu --sweep   # LM shape, bf16, on a GPU
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxent

IGNORE = -100


def naive_loss(h, w, y):
    logits = h @ w
    counted = y != IGNORE
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(counted, y, 0)
    )
    return jnp.sum(jnp.where(counted, loss, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def fused_loss(h, w, y, block_size=None):
    return jaxent.linear_softmax_cross_entropy(
        h, w, y, ignore_index=IGNORE, reduction="mean", block_size=block_size
    )


def step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_mib(fn, *args) -> float:
    compiled = fn.lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def inputs(n, d, v, dtype=jnp.float32, seed=0):
    kh, kw, ky, km = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    y = jnp.where(jax.random.uniform(km, (n,)) < 0.1, IGNORE, y)
    return h, w, y


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time per function, runs interleaved so that load drifts hit
    all of them alike."""
    for f, args in fns.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (f, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def bars(n, d, v, repeats, dtype=jnp.float32):
    h, w, y = inputs(n, d, v, dtype)
    g = jax.random.normal(jax.random.key(1), (n, v), jnp.float32).astype(dtype)
    naive, fused = step(naive_loss), step(fused_loss)
    matmuls = jax.jit(lambda h, w, g: (h @ w, g @ w.T, h.T @ g))
    mem_naive, mem_fused = temp_mib(naive, h, w, y), temp_mib(fused, h, w, y)
    t = median_times(
        {
            "naive": (naive, (h, w, y)),
            "fused": (fused, (h, w, y)),
            "matmuls": (matmuls, (h, w, g)),
        },
        repeats,
    )
    (lf, gf), (ln, gn) = fused(h, w, y), naive(h, w, y)
    err = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(gf, gn, strict=True)
    )
    name = jnp.dtype(dtype).name
    print(f"N={n} D={d} V={v} {name}, mean over 90% counted tokens")
    print(
        f"  loss fused {float(lf):.6f} naive {float(ln):.6f}; "
        f"max rel grad diff {err:.1e}"
    )
    print(
        f"  temp memory: naive {mem_naive:8.1f} MiB  fused {mem_fused:6.1f} MiB  "
        f"ratio {mem_fused / mem_naive:.3f}  (bar <= 0.10)"
    )
    print(
        f"  fwd+bwd time: naive {t['naive'] * 1e3:7.1f} ms  fused "
        f"{t['fused'] * 1e3:7.1f} ms  ratio {t['fused'] / t['naive']:.2f}  "
        "(bar <= 1.25)"
    )
    print(
        f"  three bare matmuls {t['matmuls'] * 1e3:7.1f} ms  fused / matmuls "
        f"{t['fused'] / t['matmuls']:.2f}  (goal <= 1.2)"
    )


def scaling(d, ns, vs):
    print(f"\ncompiled temp memory (MiB) of value_and_grad, D={d}, float32")
    print(
        f"{'N':>6} {'V':>7} {'logits MiB':>11} {'naive':>9} {'fused':>7} {'ratio':>7}"
    )
    for n in ns:
        for v in vs:
            args = (
                jax.ShapeDtypeStruct((n, d), jnp.float32),
                jax.ShapeDtypeStruct((d, v), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.int32),
            )
            mn, mf = (
                temp_mib(step(naive_loss), *args),
                temp_mib(step(fused_loss), *args),
            )
            print(
                f"{n:>6} {v:>7} {n * v * 4 / 2**20:>11.0f} {mn:>9.1f} {mf:>7.1f} "
                f"{mf / mn:>7.4f}"
            )


def sweep(n, d, v, repeats, tiles, dtype=jnp.float32):
    h, w, y = inputs(n, d, v, dtype)
    fns = {"naive": (step(naive_loss), (h, w, y))}
    for tile in tiles:
        f = step(lambda h, w, y, tile=tile: fused_loss(h, w, y, block_size=tile))
        fns[str(tile)] = (f, (h, w, y))
    mem = {name: temp_mib(f, *args) for name, (f, args) in fns.items()}
    t = median_times(fns, repeats)
    print(f"\ntile sweep at N={n} D={d} V={v}: (block_n, block_v), ms, temp MiB")
    for name in fns:
        print(f"  {name:>14} {t[name] * 1e3:8.1f} ms  {mem[name]:8.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--sweep", action="store_true", help="tile-shape sweep")
    parser.add_argument(
        "--gpu",
        action="store_true",
        default=jax.default_backend() == "gpu",
        help="LM shape N=8192 D=4096 V=128256 bf16 (default on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    if args.quick:
        bars(512, 64, 4096, args.repeats)
        scaling(64, [256, 1024], [4096, 16384])
        if args.sweep:
            sweep(512, 64, 4096, args.repeats, [(512, 512), (256, 2048)])
        return
    if args.gpu and not args.quick:
        n, d, v, bf16 = 8192, 4096, 128256, jnp.bfloat16
        bars(n, d, v, args.repeats, bf16)
        if args.sweep:
            tiles = [(8192, 1024), (8192, 2048), (8192, 4096), (4096, 4096)]
            tiles += [(4096, 8192), (2048, 8192), (1024, 2048)]
            sweep(n, d, v, args.repeats, tiles, bf16)
        return
    bars(2048, 256, 32768, args.repeats)
    scaling(256, [1024, 4096, 16384, 32768], [8192, 32768, 131072, 262144])
    if args.sweep:
        tiles = [(2048, 512), (2048, 1024), (1024, 1024), (512, 2048), (1024, 2048)]
        tiles += [(256, 4096), (512, 4096), (128, 8192), (256, 8192)]
        sweep(2048, 256, 32768, args.repeats, tiles)


if __name__ == "__main__":
    main()
