"""First and repeated eager calls, as a new user meets them: jaxent against optax.

For every loss whose name optax also has, on 37 x 11 float32 logits (labels of
the loss's kind), three figures for jaxent and for optax:

- ``first``: the first eager call in a fresh process (trace, compile, run);
- ``grad``: the first eager ``jax.grad`` of its sum in a fresh process;
- ``repeat``: an eager call once warm (median of many, same process).

Then the fused head, ``jaxent.linear_softmax_cross_entropy(h, w, y,
ignore_index=-100)`` called eagerly, against materialized logits
``optax.softmax_cross_entropy_with_integer_labels(h @ w, y)`` at N=1024, D=128,
V=4096: its first call in a fresh process and its warm eager forward.

Each figure is the median over ``--repeats`` fresh processes (one measurement
each, jaxent and optax interleaved); imports and input creation are not timed.
Ratios are jaxent / optax: at most 1 meets the bar. Timings are reported, never
asserted; the script exits 0.

Usage::

    python -m benchmarks.first_call            # every optax-named loss, 5 repeats
    python -m benchmarks.first_call --quick    # one loss and the head, 3 repeats (CI)
    python -m benchmarks.first_call --losses kl_divergence --modes repeat --no-head
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

N, C = 37, 11
HEAD = {"n": 1024, "d": 128, "v": 4096}
# The kind of the second argument of each optax-named loss (the first is
# logits, or log-probabilities for the KL family).
LOSSES = {
    "softmax_cross_entropy_with_integer_labels": "class_ids",
    "softmax_cross_entropy": "probs",
    "safe_softmax_cross_entropy": "probs",
    "poly_loss_cross_entropy": "probs",
    "sigmoid_binary_cross_entropy": "binary",
    "sigmoid_focal_loss": "binary",
    "kl_divergence": "probs",
    "kl_divergence_with_log_targets": "log_probs",
    "generalized_kl_divergence": "probs",
    "convex_kl_divergence": "probs",
}
QUICK = ("softmax_cross_entropy_with_integer_labels",)
MODES = ("first", "grad", "repeat")
LIBS = ("jaxent", "optax")


def _inputs(name: str):
    """NumPy inputs (creating them compiles nothing)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((N, C))).astype(np.float32)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    kind = LOSSES[name]
    if kind == "class_ids":
        y = rng.integers(0, C, N).astype(np.int32)
    elif kind == "binary":
        y = rng.uniform(size=(N, C)).astype(np.float32)
    else:
        t = 2.0 * rng.standard_normal((N, C))
        t = (t - np.log(np.exp(t).sum(-1, keepdims=True))).astype(np.float32)
        y = t if kind == "log_probs" else np.exp(t)
    first = lp if name.startswith(("kl", "generalized", "convex")) else x
    return first, y


def _library(lib: str):
    if lib == "jaxent":
        import jaxent

        return jaxent
    import optax

    return optax.losses


def _loss_child(lib: str, name: str, mode: str) -> float:
    import jax

    fn = getattr(_library(lib), name)
    x, y = (jax.device_put(a) for a in _inputs(name))
    jax.block_until_ready((x, y))
    if mode == "grad":
        start = time.perf_counter()
        jax.block_until_ready(jax.grad(lambda x: fn(x, y).sum())(x))
        return time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(x, y))
    if mode == "first":
        return time.perf_counter() - start
    return _warm(lambda: fn(x, y))


def _warm(call, calls: int = 50, rounds: int = 15) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` eager calls."""
    import jax

    for _ in range(10):
        jax.block_until_ready(call())
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(call())
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _head_child(lib: str, mode: str) -> float:
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    n, d, v = HEAD["n"], HEAD["d"], HEAD["v"]
    h = jax.device_put(rng.standard_normal((n, d)).astype(np.float32))
    w = jax.device_put((rng.standard_normal((d, v)) / np.sqrt(d)).astype(np.float32))
    y = jax.device_put(rng.integers(0, v, n).astype(np.int32))
    jax.block_until_ready((h, w, y))
    if lib == "jaxent":
        import jaxent

        def call():
            return jaxent.linear_softmax_cross_entropy(h, w, y, ignore_index=-100)
    else:
        import optax

        def call():
            return optax.softmax_cross_entropy_with_integer_labels(h @ w, y)

    start = time.perf_counter()
    jax.block_until_ready(call())
    if mode == "first":
        return time.perf_counter() - start
    return _warm(call, calls=3, rounds=7)


def _measure(lib: str, name: str, mode: str) -> float:
    """One measurement in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.first_call", "--child", lib, name, mode],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ,
    )
    if out.returncode:
        raise RuntimeError(f"{lib} {name} {mode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(label, j, o, unit, scale):
    return (
        f"| {label:<42} | {j * scale:>8.{unit}f} | {o * scale:>8.{unit}f} "
        f"| {j / o:>5.2f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one loss, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--losses", help="comma-separated loss names")
    parser.add_argument("--modes", default=",".join(MODES), help="first,grad,repeat")
    parser.add_argument("--no-head", action="store_true", help="skip the fused head")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        warnings.simplefilter("ignore")
        lib, name, mode = args.child
        if name == "head":
            print(json.dumps(_head_child(lib, mode)))
        else:
            print(json.dumps(_loss_child(lib, name, mode)))
        return

    repeats = args.repeats or (3 if args.quick else 5)
    names = QUICK if args.quick else tuple(LOSSES)
    if args.losses:
        names = tuple(args.losses.split(","))
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    jobs = [(name, mode) for name in names for mode in modes]
    if not args.no_head:
        jobs += [("head", "first"), ("head", "repeat")]
    samples = {(lib, *job): [] for job in jobs for lib in LIBS}
    for r in range(repeats):
        for i, job in enumerate(jobs):
            # Alternate which library goes first, so drifts in load hit both.
            for lib in LIBS if (r + i) % 2 == 0 else LIBS[::-1]:
                samples[(lib, *job)].append(_measure(lib, *job))
        print(f"repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}

    import jax
    import optax

    print(
        f"\njax {jax.__version__}, optax {optax.__version__}, {os.cpu_count()} CPUs, "
        f"{N} x {C} float32, median of {repeats} fresh processes\n"
    )
    missed = []
    for mode, unit, scale, title in (
        ("first", 3, 1.0, "first eager call (s)"),
        ("grad", 3, 1.0, "first eager jax.grad (s)"),
        ("repeat", 3, 1e3, "repeated eager call (ms)"),
    ):
        if mode not in modes:
            continue
        print(f"| {title:<42} | {'jaxent':>8} | {'optax':>8} | {'j/o':>5} |")
        print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 7}|")
        for name in names:
            j, o = med[("jaxent", name, mode)], med[("optax", name, mode)]
            print(_row(name, j, o, unit, scale))
            if j > o:
                missed.append(f"{name} {mode} ({j / o:.2f})")
        print()
    if not args.no_head:
        n, d, v = HEAD["n"], HEAD["d"], HEAD["v"]
        title = f"fused head N={n} D={d} V={v}"
        print(f"| {title:<42} | {'jaxent':>8} | {'optax':>8} | {'j/o':>5} |")
        print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 7}|")
        for mode, label in (("first", "first call (ms)"), ("repeat", "warm (ms)")):
            j, o = med[("jaxent", "head", mode)], med[("optax", "head", mode)]
            print(_row(label, j, o, 1, 1e3))
        print()
    print("bars missed: " + (", ".join(missed) if missed else "none"))


if __name__ == "__main__":
    main()
