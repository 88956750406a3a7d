"""Fused linear + distillation loss versus materialized logits: memory and time.

Prints, at N=2048, D=256 (student), D'=384 (teacher), V=32768, float32 on CPU,
``reduction="mean"`` with 10% ignored tokens, ``beta=0.5``:

1. the matmul FLOPs of ``jax.value_and_grad`` counted in the jaxpr
   (:mod:`benchmarks._flops`) of the default path (gradient in the forward
   pass; bar <= 1.02x materialized) and of ``low_memory=True`` (the backward
   recomputes both heads' logits);
2. compiled temp memory of ``jax.value_and_grad`` w.r.t. the student's
   ``(hidden, weight)`` of ``jaxent.linear_softmax_distillation`` (both paths)
   against two materialized paths that build both ``[N, V]`` logit arrays:
   ``reference`` (``jaxent.reference.linear_softmax_distillation``, the
   plain-JAX twin) and ``optax`` (TRL's ``generalized_jsd_loss`` written with
   ``jax.nn.log_softmax`` and ``jnp.logaddexp``, the teacher under
   ``stop_gradient``); bar: fused <= 15% of the materialized path, <= 10% at
   4x the tokens;
3. forward+backward time of all four, medians of interleaved runs after
   warm-up, in this process; bar: fused <= 1.0x the materialized path;
4. the same at ``T=2`` with a hard-label term (``hard_weight=0.5``), and at
   ``beta`` 0 and 1 (the forward and reverse KL);
5. a table of compiled temp memory versus V (compiling only).

Usage::

    python benchmarks/linear_distill.py            # the bars (~several min on 2 cores)
    python benchmarks/linear_distill.py --quick    # small shapes, a few seconds
    python benchmarks/linear_distill.py --linear-ce-style  # also optax CE timing
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from a checkout: the repository root holds jaxent and the
# benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxent
from benchmarks._flops import matmul_flops

IGNORE = -100


def fused_loss(h, w, th, tw, y, **kw):
    kw = {"reduction": "mean", **kw}
    return jaxent.linear_softmax_distillation(
        h, w, th, tw, y, ignore_index=IGNORE, **kw
    )


def reference_loss(h, w, th, tw, y, **kw):
    return jaxent.reference.linear_softmax_distillation(
        h, w, th, tw, y, ignore_index=IGNORE, reduction="mean", **kw
    )


def optax_loss(h, w, th, tw, y, beta=0.5, temperature=1.0, hard_weight=0.0):
    """TRL's generalized JSD on materialized logits, in plain jnp."""
    x = (h @ w) / temperature
    t = jax.lax.stop_gradient(th @ tw) / temperature
    lq, lp = jax.nn.log_softmax(x, axis=-1), jax.nn.log_softmax(t, axis=-1)
    if beta == 0.0:
        div = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    elif beta == 1.0:
        div = jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1)
    else:
        lm = jnp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
        div = beta * jnp.sum(jnp.exp(lp) * (lp - lm), axis=-1)
        div = div + (1 - beta) * jnp.sum(jnp.exp(lq) * (lq - lm), axis=-1)
    counted = y != IGNORE
    if hard_weight:
        ls = jax.nn.log_softmax(h @ w, axis=-1)
        ce = -jnp.take_along_axis(ls, jnp.where(counted, y, 0)[:, None], axis=-1)
        div = div + hard_weight * ce[:, 0]
    total = jnp.sum(jnp.where(counted, div, 0.0))
    return total / jnp.maximum(jnp.sum(counted), 1)


def step(loss, **kw):
    return jax.jit(jax.value_and_grad(lambda *a: loss(*a, **kw), argnums=(0, 1)))


def temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def inputs(n, d, dt, v, dtype=jnp.float32, seed=0):
    kh, kw, kth, ktw, ky, km = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    th = jax.random.normal(kth, (n, dt), jnp.float32).astype(dtype)
    tw = (2 * jax.random.normal(ktw, (dt, v), jnp.float32) / np.sqrt(dt)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    y = jnp.where(jax.random.uniform(km, (n,)) < 0.1, IGNORE, y)
    return h, w, th, tw, y


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time per function, runs interleaved (rotating order)."""
    for _ in range(warmup):
        for f, args in fns.values():
            jax.block_until_ready(f(*args))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            f, args = fns[name]
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def max_rel(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _shapes(n, d, dt, v):
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    floats = (s((n, d), f32), s((d, v), f32), s((n, dt), f32), s((dt, v), f32))
    return (*floats, s((n,), jnp.int32))


def bars(n, d, dt, v, repeats, **kw):
    args = inputs(n, d, dt, v)
    steps = {
        "fused": step(fused_loss, **kw),
        "low_memory": step(fused_loss, low_memory=True, **kw),
        "reference": step(reference_loss, **kw),
        "optax": step(optax_loss, **kw),
    }
    mem = {name: temp_mib(f, *args) for name, f in steps.items()}
    big = _shapes(4 * n, d, dt, v)
    mem4 = {name: temp_mib(steps[name], *big) for name in ("fused", "reference")}
    flops = {
        name: matmul_flops(
            jax.value_and_grad(lambda *a, f=f: f(*a, **kw), (0, 1)),
            *_shapes(n, d, dt, v),
        )
        for name, f in (
            ("fused", fused_loss),
            ("low_memory", lambda *a, **k: fused_loss(*a, low_memory=True, **k)),
            ("reference", reference_loss),
        )
    }
    t = median_times({name: (f, args) for name, f in steps.items()}, repeats)
    outs = {name: f(*args) for name, f in steps.items()}
    lf, gf = outs["fused"]
    opts = ", ".join(f"{k}={val}" for k, val in kw.items()) or "defaults"
    print(f"\nN={n} D={d} D'={dt} V={v} float32, mean over ~90% counted, {opts}")
    ratio = {k: flops[k] / flops["reference"] for k in ("fused", "low_memory")}
    print(
        f"  matmul FLOPs / materialized: fused {ratio['fused']:.3f} (bar <= 1.02), "
        f"low_memory {ratio['low_memory']:.3f}"
    )
    for name in ("low_memory", "reference", "optax"):
        ln, gn = outs[name]
        err = max(max_rel(a, b) for a, b in zip(gf, gn, strict=True))
        print(
            f"  fused vs {name:<10}: loss {float(lf):.6f} / {float(ln):.6f}, max rel "
            f"grad diff {err:.1e}; temp {mem['fused']:6.1f} / {mem[name]:7.1f} MiB "
            f"= {mem['fused'] / mem[name]:.3f}; time {t['fused'] * 1e3:6.0f} / "
            f"{t[name] * 1e3:6.0f} ms = {t['fused'] / t[name]:.2f}"
        )
    print(
        f"  bars: temp <= 0.15 of materialized (reference), <= 0.10 at 4x the tokens "
        f"({mem4['fused']:.1f} / {mem4['reference']:.1f} MiB = "
        f"{mem4['fused'] / mem4['reference']:.3f}); time <= 1.0"
    )
    return {"mem_mib": mem, "ms": {k: val * 1e3 for k, val in t.items()}}


def scaling(n, d, dt, vs):
    print(f"\ncompiled temp memory (MiB) of value_and_grad, N={n} D={d} D'={dt}")
    print(
        f"{'V':>7} {'2 x logits MiB':>15} {'reference':>10} {'fused':>7} {'ratio':>7}"
    )
    for v in vs:
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n, dt), jnp.float32),
            jax.ShapeDtypeStruct((dt, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        mr = temp_mib(step(reference_loss), *args)
        mf = temp_mib(step(fused_loss), *args)
        logits = 2 * n * v * 4 / 2**20
        print(f"{v:>7} {logits:>15.0f} {mr:>10.1f} {mf:>7.1f} {mf / mr:>7.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--only-default", action="store_true", help="beta=0.5, T=1 only"
    )
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    n, d, dt, v = (512, 64, 96, 4096) if args.quick else (2048, 256, 384, 32768)
    bars(n, d, dt, v, args.repeats)
    if not args.only_default:
        bars(n, d, dt, v, args.repeats, temperature=2.0, hard_weight=0.5)
        bars(n, d, dt, v, args.repeats, beta=0.0)
        bars(n, d, dt, v, args.repeats, beta=1.0)
    vs = [4096, 16384] if args.quick else [8192, 32768, 131072, 262144]
    scaling(n // 2 if args.quick else 4096, d, dt, vs)


if __name__ == "__main__":
    main()
