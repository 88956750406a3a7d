"""Fused linear + cross-entropy versus materialized logits: memory and time.

CPU (the default off GPU) prints:

1. The bars at N=2048, D=256, V=32768, float32, ``reduction="mean"`` with 10%
   ignored tokens: the matmul FLOPs of ``jax.value_and_grad`` counted in the
   jaxpr over materialized logits' (bar <= 1.02 for the scalar reductions,
   <= 1.34 for ``"none"``), compiled temp memory of ``jax.value_and_grad``
   w.r.t. ``(hidden, weight)`` (fused / naive, bar <= 15%, and <= 10% at 4x
   the tokens) and forward+backward time (fused / naive, bar <= 1.0), for the
   default path (gradient in the forward pass) and ``low_memory=True`` (the
   backward recomputes the logits), plus fused time over the three bare
   matmuls ``h @ W``, ``g @ W.T``, ``h.T @ g``.
   Times are medians of interleaved runs after warm-up, all in this process.
2. A table of compiled temp memory versus V and N for both paths. It only
   compiles (``jax.ShapeDtypeStruct`` inputs), so shapes with 32 GB of logits
   are fine.
3. With ``--sweep``: forward+backward time and temp memory per tile shape
   ``(block_n, block_v)`` of the XLA path, the measurements behind the default
   ``block_size``.

GPU (``--gpu``, the default there) compares, side by side in one process and
interleaved, at the Llama-3-8B head (N=8192, D=4096, V=128256) and the
Gemma-2-2B head (N=8192, D=2304, V=256000, softcap 30) in bfloat16:

- ``pallas``: ``implementation="pallas"`` (the Triton kernels, G by chunks
  into XLA's matmuls), and ``pallas bwd=fused`` with the kernels' other
  backward (see jaxent/_pallas_linear.py);
- ``xla``: ``implementation="xla"`` (blocked XLA loops);
- ``optax``: materialized logits, ``optax.softmax_cross_entropy_with_integer_labels
  (h @ W)`` (after the softcap for Gemma);
- ``matmuls``: the three bare matmuls ``h @ W``, ``g @ W.T``, ``h.T @ g`` of
  the same shapes (what materialized logits cost at least);

each with its compiled temp memory, the loss and gradient differences from the
XLA path, and a ``filter_eps`` measurement on peaked logits (each hidden state
points at its label's weight column, as in a trained model): time with and
without the filter and the loss / gradient error it causes. ``--pallas-sweep``
adds the kernels' tile and launch parameters. ``--json PATH`` writes every
figure (benchmarks/gpu_check.py uses it); ``--small`` runs the GPU mode's code
at toy sizes (the kernels interpreted on CPU) to check the plumbing.

The naive path is ``optax.softmax_cross_entropy_with_integer_labels(h @ W, y)``
with the ignored tokens masked out of the mean.

Usage::

    python benchmarks/linear_ce.py            # CPU bars + scaling table (~2 min)
    python benchmarks/linear_ce.py --quick    # small shapes, a few seconds
    python benchmarks/linear_ce.py --sweep    # also the XLA tile-shape sweep
    python benchmarks/linear_ce.py --gpu --json out/linear_ce.json  # on a GPU
    python benchmarks/linear_ce.py --gpu --small   # GPU mode's plumbing on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Run as a script from a checkout: the repository root holds jaxent and the
# benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxent
from benchmarks._flops import matmul_flops
from jaxent import _pallas_linear

IGNORE = -100

# The GPU configurations: name -> (N, D, V, softcap).
GPU_CONFIGS = {
    "llama3_8b": (8192, 4096, 128256, None),
    "gemma2_2b": (8192, 2304, 256000, 30.0),
}
SMALL_CONFIGS = {
    "llama3_8b": (256, 128, 1000, None),
    "gemma2_2b": (256, 96, 2000, 30.0),
}
FILTER_EPS = 2.0**-12  # Cut Cross-Entropy's default for bfloat16


def naive_loss(h, w, y, softcap=None):
    logits = h @ w
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    counted = y != IGNORE
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(counted, y, 0)
    )
    return jnp.sum(jnp.where(counted, loss, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def fused_loss(h, w, y, block_size=None, implementation=None, **kw):
    kw = {"reduction": "mean", **kw}
    return jaxent.linear_softmax_cross_entropy(
        h,
        w,
        y,
        ignore_index=IGNORE,
        block_size=block_size,
        implementation=implementation,
        **kw,
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


def peaked(h, w, y, scale):
    """Hidden states whose logits look like a confident model's: the label's
    at ``scale``, two other classes at 0.9 and 0.8 of it, and the long tail of
    the vocabulary near 0 (the original ``h`` as noise)."""
    v = w.shape[1]
    k1, k2 = jax.random.split(jax.random.key(7))
    y0 = jnp.where(y == IGNORE, 0, y)
    alt1 = jax.random.randint(k1, y.shape, 0, v)
    alt2 = jax.random.randint(k2, y.shape, 0, v)
    cols = w.T.astype(jnp.float32)
    unit = cols / jnp.sum(cols * cols, axis=1, keepdims=True)  # unit logit each
    target = unit[y0] + 0.9 * unit[alt1] + 0.8 * unit[alt2]
    noise = h.astype(jnp.float32) / np.sqrt(h.shape[1])
    return (scale * target + noise).astype(h.dtype)


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time per function, runs interleaved (rotating order) so that
    load drifts hit all of them alike; every sample is kept."""
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
    return {name: float(np.median(t)) for name, t in times.items()}, times


def max_rel(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def flop_ratios(n, d, v) -> dict:
    """Matmul FLOPs counted in the jaxprs (:mod:`benchmarks._flops`), over
    materialized logits' ``value_and_grad`` (three ``N x D x V`` matmuls), or
    over one matmul for a forward call and ``d hidden`` alone."""
    s = jax.ShapeDtypeStruct
    args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32))
    tw = s((n,), jnp.float32)
    one = 2 * n * d * v
    base = matmul_flops(jax.value_and_grad(naive_loss, (0, 1)), *args)
    every = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)

    def vg(argnums=(0, 1), **kw):
        def loss(h, w, y, tw):
            out = fused_loss(h, w, y, **kw, token_weights=tw)
            return out if out.ndim == 0 else jnp.sum(out)

        return matmul_flops(jax.value_and_grad(loss, argnums), *args, tw) / base

    return {
        'value_and_grad "mean", token_weights, every option': vg(**every),
        'value_and_grad "sum"': vg(reduction="sum"),
        "value_and_grad, low_memory=True": vg(low_memory=True),
        'value_and_grad "none" (summed after)': vg(reduction="none"),
        "forward only / one matmul": matmul_flops(fused_loss, *args) / one,
        "d hidden only / one matmul": vg((0,)) * base / one,
    }


def bars(n, d, v, repeats, dtype=jnp.float32):
    h, w, y = inputs(n, d, v, dtype)
    g = jax.random.normal(jax.random.key(1), (n, v), jnp.float32).astype(dtype)
    naive, fused = step(naive_loss), step(fused_loss)
    low = step(lambda h, w, y: fused_loss(h, w, y, low_memory=True))
    matmuls = jax.jit(lambda h, w, g: (h @ w, g @ w.T, h.T @ g))
    mem = {k: temp_mib(f, h, w, y) for k, f in (("naive", naive), ("fused", fused))}
    mem["low_memory"] = temp_mib(low, h, w, y)
    big = (
        jax.ShapeDtypeStruct((4 * n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((4 * n,), jnp.int32),
    )
    mem4 = {k: temp_mib(f, *big) for k, f in (("naive", naive), ("fused", fused))}
    t, _ = median_times(
        {
            "naive": (naive, (h, w, y)),
            "fused": (fused, (h, w, y)),
            "low_memory": (low, (h, w, y)),
            "matmuls": (matmuls, (h, w, g)),
        },
        repeats,
    )
    (lf, gf), (ln, gn) = fused(h, w, y), naive(h, w, y)
    err = max(max_rel(a, b) for a, b in zip(gf, gn, strict=True))
    name = jnp.dtype(dtype).name
    print(f"N={n} D={d} V={v} {name}, mean over 90% counted tokens")
    print(
        f"  loss fused {float(lf):.6f} naive {float(ln):.6f}; "
        f"max rel grad diff {err:.1e}"
    )
    print("  matmul FLOPs / materialized logits (bar <= 1.02; 'none' <= 1.34):")
    for key, ratio in flop_ratios(n, d, v).items():
        print(f"    {key:<52} {ratio:.3f}")
    print(
        f"  temp memory: naive {mem['naive']:8.1f} MiB  fused {mem['fused']:6.1f} "
        f"MiB  ratio {mem['fused'] / mem['naive']:.3f}  (bar <= 0.15); "
        f"low_memory {mem['low_memory']:6.1f} MiB"
    )
    print(
        f"  temp memory at 4x the tokens: naive {mem4['naive']:8.1f} MiB  fused "
        f"{mem4['fused']:6.1f} MiB  ratio {mem4['fused'] / mem4['naive']:.3f}  "
        "(bar <= 0.10)"
    )
    print(
        f"  fwd+bwd time: naive {t['naive'] * 1e3:7.1f} ms  fused "
        f"{t['fused'] * 1e3:7.1f} ms  ratio {t['fused'] / t['naive']:.2f} (bar <= "
        f"1.0); low_memory {t['low_memory'] / t['naive']:.2f}"
    )
    print(
        f"  three bare matmuls {t['matmuls'] * 1e3:7.1f} ms  fused / matmuls "
        f"{t['fused'] / t['matmuls']:.2f}"
    )


def scaling(d, ns, vs):
    print(f"\ncompiled temp memory (MiB) of value_and_grad, D={d}, float32")
    print(
        f"{'N':>6} {'V':>7} {'logits MiB':>11} {'naive':>9} {'fused':>7} "
        f"{'ratio':>7} {'low_memory':>11}"
    )
    low = step(lambda h, w, y: fused_loss(h, w, y, low_memory=True))
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
            ml = temp_mib(low, *args)
            print(
                f"{n:>6} {v:>7} {n * v * 4 / 2**20:>11.0f} {mn:>9.1f} {mf:>7.1f} "
                f"{mf / mn:>7.4f} {ml:>11.1f}"
            )


def sweep(n, d, v, repeats, tiles, dtype=jnp.float32):
    h, w, y = inputs(n, d, v, dtype)
    fns = {"naive": (step(naive_loss), (h, w, y))}
    for tile in tiles:

        def loss(h, w, y, tile=tile):
            return fused_loss(h, w, y, block_size=tile, implementation="xla")

        fns[str(tile)] = (step(loss), (h, w, y))
    mem = {name: temp_mib(f, *args) for name, (f, args) in fns.items()}
    t, _ = median_times(fns, repeats)
    print(f"\ntile sweep at N={n} D={d} V={v}: (block_n, block_v), ms, temp MiB")
    for name in fns:
        print(f"  {name:>14} {t[name] * 1e3:8.1f} ms  {mem[name]:8.1f} MiB")


# -- GPU mode ---------------------------------------------------------------------


@contextlib.contextmanager
def kernel_params(**params):
    """Temporarily sets module constants of jaxent._pallas_linear (read when a
    program is traced)."""
    old = {k: getattr(_pallas_linear, k) for k in params}
    for k, val in params.items():
        setattr(_pallas_linear, k, val)
    try:
        yield
    finally:
        for k, val in old.items():
            setattr(_pallas_linear, k, val)


def compiled(loss, args, **params):
    """AOT-compiled ``value_and_grad(loss)`` (under kernel ``params``) and its
    temp memory in MiB."""
    with kernel_params(**params):
        exe = step(loss).lower(*args).compile()
    return exe, exe.memory_analysis().temp_size_in_bytes / 2**20


def gpu_config(name, n, d, v, softcap, repeats, dtype, pallas_sweep):
    """Every variant at one shape: times, temp memory, errors; then filter_eps."""
    h, w, y = inputs(n, d, v, dtype)
    g = jax.random.normal(jax.random.key(1), (n, v), jnp.float32).astype(dtype)
    kw = {} if softcap is None else {"softcap": softcap}
    losses = {
        "pallas": lambda h, w, y: fused_loss(h, w, y, implementation="pallas", **kw),
        "xla": lambda h, w, y: fused_loss(h, w, y, implementation="xla", **kw),
        "xla low_memory": lambda h, w, y: fused_loss(h, w, y, low_memory=True, **kw),
        "optax": lambda h, w, y: naive_loss(h, w, y, softcap),
    }
    fns, mem = {}, {}
    for key, loss in losses.items():
        fns[key], mem[key] = compiled(loss, (h, w, y))
        fns[key] = (fns[key], (h, w, y))
    # The kernels' other backward: d hidden and d weight kernels.
    fused = "pallas bwd=fused"
    exe, mem[fused] = compiled(losses["pallas"], (h, w, y), BACKWARD="fused")
    fns[fused] = (exe, (h, w, y))
    matmuls = jax.jit(lambda h, w, g: (h @ w, g @ w.T, h.T @ g))
    exe = matmuls.lower(h, w, g).compile()
    fns["matmuls"] = (exe, (h, w, g))
    mem["matmuls"] = exe.memory_analysis().temp_size_in_bytes / 2**20
    if pallas_sweep:
        for params in PALLAS_SWEEP:
            label = "pallas " + " ".join(f"{k}={val}" for k, val in params.items())
            exe, mem[label] = compiled(losses["pallas"], (h, w, y), **params)
            fns[label] = (exe, (h, w, y))
    t, samples = median_times(fns, repeats)
    outs = {key: fns[key][0](h, w, y) for key in (*losses, fused)}
    ref_loss, ref_grads = outs["xla"]
    errors = {}
    for key in ("pallas", fused, "xla low_memory", "optax"):
        loss, grads = outs[key]
        errors[key] = {
            "loss_abs": float(jnp.abs(loss.astype(jnp.float32) - ref_loss)),
            "dh_max_rel": max_rel(grads[0], ref_grads[0]),
            "dw_max_rel": max_rel(grads[1], ref_grads[1]),
        }
    cap = f", softcap {softcap}" if softcap is not None else ""
    print(f"\n{name}: N={n} D={d} V={v} {jnp.dtype(dtype).name}{cap}")
    print(f"  {'variant':<42} {'ms':>9} {'x matmuls':>10} {'temp MiB':>10}")
    for key in fns:
        ratio = t[key] / t["matmuls"]
        print(f"  {key:<42} {t[key] * 1e3:9.2f} {ratio:10.2f} {mem[key]:10.1f}")
    for key, e in errors.items():
        print(
            f"  {key} vs xla: loss {e['loss_abs']:.2e}, d hidden max rel "
            f"{e['dh_max_rel']:.2e}, d weight max rel {e['dw_max_rel']:.2e}"
        )
    result = {
        "shape": {"N": n, "D": d, "V": v, "dtype": jnp.dtype(dtype).name},
        "softcap": softcap,
        "ms": {k: val * 1e3 for k, val in t.items()},
        "samples_ms": {k: [s * 1e3 for s in val] for k, val in samples.items()},
        "temp_mib": mem,
        "errors_vs_xla": errors,
    }
    result["filter"] = filter_measurement(h, w, y, kw, repeats)
    return result


def filter_measurement(h, w, y, kw, repeats, scale=16.0):
    """Time and error of ``filter_eps`` on peaked logits, both implementations."""
    hp = peaked(h, w, y, scale)
    fns, outs = {}, {}
    for impl in ("pallas", "xla"):
        for eps in (None, FILTER_EPS):

            def loss(h, w, y, impl=impl, eps=eps):
                return fused_loss(h, w, y, implementation=impl, filter_eps=eps, **kw)

            key = f"{impl} filter_eps={eps}"
            exe, _ = compiled(loss, (hp, w, y))
            fns[key] = (exe, (hp, w, y))
    t, _ = median_times(fns, repeats)
    for key, (exe, args) in fns.items():
        outs[key] = exe(*args)
    print(
        f"  filter_eps={FILTER_EPS:.3g} on peaked logits (label's logit ~{scale}, "
        "two runner-ups at 0.9 and 0.8 of it)"
    )
    exact_loss = float(outs["xla filter_eps=None"][0])
    result = {"eps": FILTER_EPS, "exact_loss": exact_loss, "ms": {}, "errors": {}}
    for impl in ("pallas", "xla"):
        base, filt = f"{impl} filter_eps=None", f"{impl} filter_eps={FILTER_EPS}"
        (l0, g0), (l1, g1) = outs[base], outs[filt]
        err = {
            "loss_abs": float(jnp.abs(l1.astype(jnp.float32) - l0)),
            "dh_max_rel": max_rel(g1[0], g0[0]),
            "dw_max_rel": max_rel(g1[1], g0[1]),
        }
        result["ms"][impl] = {"exact": t[base] * 1e3, "filtered": t[filt] * 1e3}
        result["errors"][impl] = err
        print(
            f"    {impl:<6} {t[base] * 1e3:8.2f} -> {t[filt] * 1e3:8.2f} ms; loss "
            f"{err['loss_abs']:.1e}, d hidden {err['dh_max_rel']:.1e}, d weight "
            f"{err['dw_max_rel']:.1e} (max rel)"
        )
    print(f"    mean loss on these logits {exact_loss:.4f}")
    return result


# Kernel parameters the --pallas-sweep tries: the neighbours of the defaults.
PALLAS_SWEEP = [
    {"BLOCK_N": 64},
    {"BLOCK_V": 256},
    {"NUM_WARPS": 8},
    {"NUM_STAGES": 4},
    {"G_CHUNK_BYTES": 2**27},
]


def gpu(args) -> dict:
    configs = SMALL_CONFIGS if args.small else GPU_CONFIGS
    device = jax.devices()[0]
    out = {
        "jax": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "repeats": args.repeats,
        "configs": {},
    }
    for name, (n, d, v, softcap) in configs.items():
        if args.configs and name not in args.configs.split(","):
            continue
        out["configs"][name] = gpu_config(
            name, n, d, v, softcap, args.repeats, jnp.bfloat16, args.pallas_sweep
        )
        if args.json:
            write_json(args.json, out)
    return out


def write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU shapes")
    parser.add_argument("--sweep", action="store_true", help="XLA tile sweep")
    parser.add_argument(
        "--gpu",
        action="store_true",
        default=jax.default_backend() == "gpu",
        help="Llama-3-8B and Gemma-2-2B heads in bf16 (default on a GPU)",
    )
    parser.add_argument("--small", action="store_true", help="GPU mode, toy sizes")
    parser.add_argument("--configs", default="", help="GPU configs, comma-separated")
    parser.add_argument("--pallas-sweep", action="store_true", help="kernel params")
    parser.add_argument("--json", default="", help="write the GPU figures here")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")
    if args.gpu or args.small:
        gpu(args)
        return
    if args.quick:
        bars(512, 64, 4096, args.repeats)
        scaling(64, [256, 1024], [4096, 16384])
        if args.sweep:
            sweep(512, 64, 4096, args.repeats, [(512, 512), (256, 2048)])
        return
    bars(2048, 256, 32768, args.repeats)
    scaling(256, [1024, 4096, 16384, 32768], [8192, 32768, 131072, 262144])
    if args.sweep:
        tiles = [(2048, 512), (2048, 1024), (1024, 1024), (512, 2048), (1024, 2048)]
        tiles += [(256, 4096), (512, 4096), (128, 8192), (256, 8192)]
        sweep(2048, 256, 32768, args.repeats, tiles)


if __name__ == "__main__":
    main()
