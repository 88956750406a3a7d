"""Fused linear + top-k distillation versus materialized logits: memory, time
and matmul FLOPs.

Prints, at N=2048, D=256, V=32768, k=32 stored teacher log-probabilities,
float32 on CPU, ``reduction="mean"`` with 10% ignored tokens and a hard-label
term (``hard_weight=0.5``), for ``jax.value_and_grad`` w.r.t. the student's
``(hidden, weight)``:

1. the matmul FLOPs counted in the jaxpr (:mod:`benchmarks._flops`) over the
   materialized path's (bar <= 1.02);
2. compiled temp memory of ``jaxent.linear_topk_distillation`` against two
   materialized paths: ``reference``
   (``jaxent.reference.linear_topk_distillation``, the plain-JAX twin) and
   ``jnp`` (the bucket KL written with ``jax.nn.log_softmax``, a gather and a
   masked log-sum-exp); bar <= 10%;
3. forward+backward time, medians of interleaved runs after warm-up in this
   process; bar <= 1.0x the materialized path.

Usage::

    python benchmarks/linear_topk.py            # the bars (a few minutes on 2 cores)
    python benchmarks/linear_topk.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from a checkout: the repository root holds jaxent and the
# benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxent
from benchmarks._flops import matmul_flops
from benchmarks.linear_distill import max_rel, median_times, temp_mib

IGNORE = -100
KW = dict(hard_weight=0.5, reduction="mean")


def fused_loss(h, w, ids, lq, y, **kw):
    return jaxent.linear_topk_distillation(h, w, ids, lq, y, **KW, **kw)


def reference_loss(h, w, ids, lq, y):
    return jaxent.reference.linear_topk_distillation(h, w, ids, lq, y, **KW)


def jnp_loss(h, w, ids, lq, y):
    """The bucket KL plus half the cross-entropy on materialized logits."""
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    counted = y != IGNORE
    a = jnp.take_along_axis(logp, ids, axis=-1)
    listed = jnp.zeros(logp.shape, bool).at[jnp.arange(ids.shape[0])[:, None], ids]
    listed = listed.set(True)
    b = jax.nn.logsumexp(jnp.where(listed, -jnp.inf, logp), axis=-1)
    q = jnp.exp(lq)
    q_r = jnp.maximum(1 - jnp.sum(q, -1), 0)
    kl = jnp.sum(q * (lq - a), -1) + jnp.where(
        q_r > 0, q_r * (jnp.log(jnp.where(q_r > 0, q_r, 1)) - b), 0
    )
    ce = -jnp.take_along_axis(logp, jnp.where(counted, y, 0)[:, None], -1)[:, 0]
    loss = jnp.where(counted, kl + 0.5 * ce, 0.0)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(counted), 1)


def inputs(n, d, v, k, seed=0):
    kh, kw, kt, ky, km = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(kh, (n, d), jnp.float32)
    w = jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)
    # A peaked teacher: its top k hold most of the mass.
    teacher = jax.nn.log_softmax(4 * jax.random.normal(kt, (n, v)), axis=-1)
    lq, ids = jax.lax.top_k(teacher, k)
    y = jax.random.randint(ky, (n,), 0, v)
    y = jnp.where(jax.random.uniform(km, (n,)) < 0.1, IGNORE, y)
    return h, w, ids, lq, y


def step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bars(n, d, v, k, repeats):
    args = inputs(n, d, v, k)
    steps = {
        "fused": step(fused_loss),
        "reference": step(reference_loss),
        "jnp": step(jnp_loss),
    }
    mem = {name: temp_mib(f, *args) for name, f in steps.items()}
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    flops = {
        name: matmul_flops(jax.value_and_grad(f, (0, 1)), *shapes)
        for name, f in (("fused", fused_loss), ("reference", reference_loss))
    }
    t = median_times({name: (f, args) for name, f in steps.items()}, repeats)
    outs = {name: f(*args) for name, f in steps.items()}
    lf, gf = outs["fused"]
    print(f"N={n} D={d} V={v} k={k} float32, mean over ~90% counted, hard_weight=0.5")
    print(
        f"  matmul FLOPs / materialized: {flops['fused'] / flops['reference']:.3f} "
        "(bar <= 1.02)"
    )
    for name in ("reference", "jnp"):
        ln, gn = outs[name]
        err = max(max_rel(a, b) for a, b in zip(gf, gn, strict=True))
        print(
            f"  fused vs {name:<10}: loss {float(lf):.6f} / {float(ln):.6f}, max rel "
            f"grad diff {err:.1e}; temp {mem['fused']:6.1f} / {mem[name]:7.1f} MiB "
            f"= {mem['fused'] / mem[name]:.3f}; time {t['fused'] * 1e3:6.0f} / "
            f"{t[name] * 1e3:6.0f} ms = {t['fused'] / t[name]:.2f}"
        )
    print("  bars: temp <= 0.10 and time <= 1.0 of the materialized paths")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    if args.quick:
        bars(512, 64, 4096, 16, args.repeats)
    else:
        bars(2048, 256, 32768, 32, args.repeats)


if __name__ == "__main__":
    main()
