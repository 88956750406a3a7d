"""Fused per-token log-probabilities + entropy versus materialized logits, under
an RL objective: memory and time.

Prints, at N=2048, D=256, V=32768, float32 on CPU, for ``jax.value_and_grad``
w.r.t. ``(hidden, weight)`` of a PPO-style clipped-ratio objective with an
entropy bonus::

    r = exp(lp - lp_old)
    loss = -mean(min(r A, clip(r, 0.8, 1.2) A)) - 0.01 mean(H)

with ``lp, H`` from ``jaxent.linear_log_probs(..., return_entropy=True)``
(``fused``) against the same objective on materialized ``[N, V]`` logits in
plain JAX (``jax.nn.log_softmax``, ``materialized``) and the plain-JAX twin
``jaxent.reference.linear_log_probs`` (``reference``):

1. compiled temp memory; bar: fused <= 10% of materialized;
2. forward+backward time, medians of interleaved runs after warm-up, in this
   process; bar: fused <= 1.3x materialized;
3. the same at ``T=0.7`` with a softcap of 30 (all with a bias);
4. a table of compiled temp memory versus V (compiling only).

Usage::

    python benchmarks/log_probs.py            # the bars (a few minutes on 2 cores)
    python benchmarks/log_probs.py --quick    # small shapes, a few seconds
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
from benchmarks.linear_distill import max_rel, median_times

CLIP, ENTROPY_BONUS = 0.2, 0.01


def fused(h, w, b, y, **kw):
    return jaxent.linear_log_probs(h, w, y, bias=b, return_entropy=True, **kw)


def reference(h, w, b, y, **kw):
    return jaxent.reference.linear_log_probs(h, w, y, bias=b, return_entropy=True, **kw)


def materialized(h, w, b, y, temperature=1.0, softcap=None):
    """Log-probabilities and entropy from materialized logits, in plain jnp."""
    x = h @ w + b
    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    logp = jax.nn.log_softmax(x / temperature, axis=-1)
    lp = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return lp, ent


def objective(log_probs, **kw):
    """The clipped-ratio objective with an entropy bonus, of ``(hidden,
    weight)``; ``lp_old`` and the advantages are data."""

    def loss(h, w, b, y, lp_old, adv):
        lp, ent = log_probs(h, w, b, y, **kw)
        r = jnp.exp(lp - lp_old)
        clipped = jnp.minimum(r * adv, jnp.clip(r, 1 - CLIP, 1 + CLIP) * adv)
        return -jnp.mean(clipped) - ENTROPY_BONUS * jnp.mean(ent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def inputs(n, d, v, seed=0):
    """A policy, sampled tokens, the sampling policy's log-probabilities (the
    policy a step earlier: slightly perturbed logits) and advantages."""
    kh, kw, kb, ky, kp, ka = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(kh, (n, d), jnp.float32)
    w = jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)
    b = jax.random.normal(kb, (v,), jnp.float32) * 0.1
    y = jax.random.randint(ky, (n,), 0, v)
    lp_old = jax.jit(lambda: fused(h, w, b, y)[0])()
    lp_old = lp_old + 0.1 * jax.random.normal(kp, (n,), jnp.float32)
    adv = jax.random.normal(ka, (n,), jnp.float32)
    return h, w, b, y, lp_old, adv


def bars(n, d, v, repeats, **kw):
    args = inputs(n, d, v)
    steps = {
        "fused": objective(fused, **kw),
        "materialized": objective(materialized, **kw),
        "reference": objective(reference, **kw),
    }
    mem = {name: temp_mib(f, *args) for name, f in steps.items()}
    t = median_times({name: (f, args) for name, f in steps.items()}, repeats)
    outs = {name: f(*args) for name, f in steps.items()}
    lf, gf = outs["fused"]
    opts = ", ".join(f"{k}={val}" for k, val in kw.items()) or "T=1, no softcap"
    print(f"\nN={n} D={d} V={v} float32, clipped ratio + entropy bonus, {opts}")
    for name in ("materialized", "reference"):
        ln, gn = outs[name]
        err = max(max_rel(a, b) for a, b in zip(gf, gn, strict=True))
        print(
            f"  vs {name:<12}: loss {float(lf):.6f} / {float(ln):.6f}, max rel grad "
            f"diff {err:.1e}; temp {mem['fused']:6.1f} / {mem[name]:7.1f} MiB = "
            f"{mem['fused'] / mem[name]:.3f} (bar <= 0.10); time "
            f"{t['fused'] * 1e3:6.0f} / {t[name] * 1e3:6.0f} ms = "
            f"{t['fused'] / t[name]:.2f} (bar <= 1.3)"
        )
    return {"mem_mib": mem, "ms": {k: val * 1e3 for k, val in t.items()}}


def scaling(n, d, vs):
    print(f"\ncompiled temp memory (MiB) of value_and_grad, N={n} D={d}")
    print(f"{'V':>7} {'logits MiB':>11} {'materialized':>13} {'fused':>7} {'ratio':>7}")
    for v in vs:
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((v,), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n,), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.float32),
        )
        mm = temp_mib(objective(materialized), *args)
        mf = temp_mib(objective(fused), *args)
        logits = n * v * 4 / 2**20
        print(f"{v:>7} {logits:>11.0f} {mm:>13.1f} {mf:>7.1f} {mf / mm:>7.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only-default", action="store_true", help="T=1 only")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    n, d, v = (512, 64, 4096) if args.quick else (2048, 256, 32768)
    bars(n, d, v, args.repeats)
    if not args.only_default:
        bars(n, d, v, args.repeats, temperature=0.7, softcap=30.0)
    vs = [4096, 16384] if args.quick else [8192, 32768, 131072, 262144]
    scaling(n // 2 if args.quick else 4096, d, vs)


if __name__ == "__main__":
    main()
