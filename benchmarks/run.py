"""jaxent side by side with optax, plain autodiff and the memory floor.

Every case is ``jax.jit(jax.value_and_grad(loss))`` with a mean reduction, run
in this one process. Each repeat times jaxent and every peer once, in rotating
order, so drifts in machine load hit all of them alike; a figure is the median
of the repeats after warm-up. Peers:

- optax: the same-named function, or an optax composition where optax lacks
  the option (the table's notes say which);
- reference: ``jaxent.reference``, the same formula under plain autodiff;
- floor: ``jax.jit(lambda x: x * 2)`` on the logits, one pass that reads them
  and writes an array of their size. Forward + backward must read the logits at
  least twice and write the gradient.

Besides time, each case reports the compiled temp memory
(``memory_analysis().temp_size_in_bytes``) of jaxent and optax, the residuals
the forward saves for the backward that are N x C and not inputs (found with
``jax.ad_checkpoint.print_saved_residuals``), and the N x C reads and writes of
the optimized HLO. Values and gradients of jaxent are checked against both
peers; a disagreement, or an N x C residual saved by jaxent, makes the run exit
with status 1. Timings are reported, never asserted.

Usage::

    python -m benchmarks.run                     # every case, default sizes
    python -m benchmarks.run --quick             # CI: small, checks values only
    python -m benchmarks.run --cases int,soft --n 4096 --c 8192 --repeats 21
    python -m benchmarks.run --dtype bfloat16 --profile   # + per-kernel times

Default sizes: 4096 x 8192 float32 on CPU; 8192 x 128256 in bfloat16 and
float32 on GPU. Writes ``results.json`` and ``results.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import _cases, _hlo
except ImportError:  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _cases, _hlo

PEERS = ("jaxent", "optax", "reference")
# The bars on CPU: jaxent / peer at most this.
BARS = {
    ("int", "optax"): 1.0,
    ("int", "floor"): 1.3,
    ("soft", "optax"): 0.9,
    ("soft_both", "optax"): 0.85,
    ("kl", "optax"): 0.9,
}
MIB = 2**20
# Peak HBM bandwidth (bytes/s) by device kind, for the GPU floor.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_floor_ms(n: int, c: int, dtype) -> float | None:
    """Three N x C passes (read the logits twice, write the gradient) at the
    device's peak bandwidth, or None off a known GPU."""
    if jax.default_backend() != "gpu":
        return None
    kind = jax.devices()[0].device_kind
    peak = next((bw for name, bw in HBM_BANDWIDTH.items() if name in kind), None)
    if peak is None:
        return None
    return 1e3 * 3 * n * c * jnp.dtype(dtype).itemsize / peak


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cases",
        default=",".join(_cases.CASES),
        help="comma-separated case names (default: all): %(default)s",
    )
    p.add_argument("--n", type=int, help="rows (default: by backend)")
    p.add_argument("--c", type=int, help="classes (default: by backend)")
    p.add_argument(
        "--dtype",
        help="logits dtype, e.g. float32, bfloat16 (default: by backend)",
    )
    p.add_argument("--repeats", type=int, default=15, help="timed runs per peer")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per peer")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: 256 x 2048, 3 repeats; checks values, asserts no timing",
    )
    p.add_argument("--out", default="out/benchmarks", help="folder for JSON + PNG")
    p.add_argument("--json", help="JSON path (default: OUT/results.json)")
    p.add_argument("--png", help="chart path (default: OUT/results.png)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print per-kernel times of jaxent and optax (profiler trace)",
    )
    p.add_argument("--hlo", help="folder to write each optimized HLO module to")
    args = p.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(_cases.CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; known: {list(_cases.CASES)}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = 1
    return args


def configs(args) -> list[tuple[int, int, str]]:
    """(rows, classes, dtype) to run: flags first, then backend defaults."""
    if args.quick:
        defaults = [(256, 2048, "float32")]
    elif jax.default_backend() == "gpu":
        defaults = [(8192, 128256, "bfloat16"), (8192, 128256, "float32")]
    else:
        defaults = [(4096, 8192, "float32")]
    if args.dtype:
        defaults = list(dict.fromkeys((n, c, args.dtype) for n, c, _ in defaults))
    return [(args.n or n, args.c or c, dtype) for n, c, dtype in defaults]


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import optax

    import jaxent

    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "jaxent": jaxent.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def _step(loss, argnums):
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _restricted(loss, args, argnums):
    """``loss`` as a function of the differentiated arguments only."""

    def fn(*diff):
        full = list(args)
        for i, a in zip(argnums, diff, strict=True):
            full[i] = a
        return loss(*full)

    return fn, tuple(args[i] for i in argnums)


_RESIDUAL = re.compile(r"^\w+\[([\d,]*)\]\s+(.*)$")


def big_residuals(loss, args, argnums, big: int) -> list[str]:
    """Residuals of at least ``big`` elements that are not inputs."""
    fn, diff = _restricted(loss, args, argnums)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(fn, *diff)
    found = []
    for line in buf.getvalue().splitlines():
        m = _RESIDUAL.match(line.strip())
        if not m:
            continue
        size = int(np.prod([int(d) for d in m.group(1).split(",") if d]))
        source = m.group(2)
        if size >= big and not source.startswith(("from the argument", "from a")):
            found.append(line.strip())
    return found


def mismatch(a, b) -> float:
    """Largest error of ``a`` against ``b`` over value and gradients, relative
    to the largest magnitude of each leaf of ``b``."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y))), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def timed(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Interleaved wall times (s): each repeat runs every callable once, the
    order rotating between repeats."""
    names = list(calls)
    samples = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            fn, args = calls[k]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[k].append(time.perf_counter() - t0)
    return samples


def run_case(case, n, c, dtype, opts) -> dict:
    args = case.make(jax.random.key(0), n, c, jnp.dtype(dtype))
    losses = {"jaxent": case.jaxent, "optax": case.optax, "reference": case.reference}
    compiled = {
        k: _step(loss, case.argnums).lower(*args).compile()
        for k, loss in losses.items()
    }
    compiled["floor"] = jax.jit(lambda x: x * 2).lower(args[0]).compile()
    calls = {k: (fn, args if k != "floor" else args[:1]) for k, fn in compiled.items()}

    outs = {k: compiled[k](*args) for k in PEERS}
    tol = 1e-4 if jnp.dtype(dtype).itemsize >= 4 else 3e-2
    errors = {k: mismatch(outs["jaxent"], outs[k]) for k in ("optax", "reference")}
    del outs
    for _ in range(opts.warmup):
        for fn, a in calls.values():
            jax.block_until_ready(fn(*a))
    samples = timed(calls, opts.repeats)
    ms = {k: 1e3 * float(np.median(v)) for k, v in samples.items()}

    big = n * c
    temp = {k: compiled[k].memory_analysis().temp_size_in_bytes for k in PEERS}
    residuals = {
        k: big_residuals(losses[k], args, case.argnums, big)
        for k in ("jaxent", "optax")
    }
    hlo = {k: compiled[k].as_text() for k in PEERS}
    if opts.hlo:
        folder = Path(opts.hlo)
        folder.mkdir(parents=True, exist_ok=True)
        for k, text in hlo.items():
            (folder / f"{case.name}_{n}x{c}_{dtype}_{k}.hlo").write_text(text)
    pass_counts = {k: _hlo.passes(hlo[k], big) for k in PEERS}
    profile = None
    if opts.profile:
        profile = {k: _hlo.profile(compiled[k], args) for k in ("jaxent", "optax")}
    return {
        "case": case.name,
        "title": case.title,
        "optax_peer": case.optax_peer,
        "n": n,
        "c": c,
        "dtype": dtype,
        "ms": ms,
        "samples_ms": {k: [1e3 * s for s in v] for k, v in samples.items()},
        "ratio": {k: ms["jaxent"] / ms[k] for k in ("optax", "reference", "floor")},
        "hbm_floor_ms": hbm_floor_ms(n, c, dtype),
        "temp_bytes": temp,
        "big_residuals": residuals,
        "passes": pass_counts,
        "mismatch": errors,
        "tolerance": tol,
        "agree": all(e <= tol for e in errors.values()),
        "profile": profile,
    }


def _passes(p: dict) -> str:
    return f"{p['reads']}R{p['writes']}W"


def table(results: list[dict]) -> str:
    head = (
        "case",
        "jaxent ms",
        "optax ms",
        "ref ms",
        "floor ms",
        "j/optax",
        "j/ref",
        "j/floor",
        "temp MiB j/o",
        "NxC res j/o",
        "passes j/o",
        "agree",
    )
    rows = [head]
    for r in results:
        t, ms, ratio = r["temp_bytes"], r["ms"], r["ratio"]
        rows.append(
            (
                r["case"],
                f"{ms['jaxent']:.2f}",
                f"{ms['optax']:.2f}",
                f"{ms['reference']:.2f}",
                f"{ms['floor']:.2f}",
                f"{ratio['optax']:.2f}",
                f"{ratio['reference']:.2f}",
                f"{ratio['floor']:.2f}",
                f"{t['jaxent'] / MIB:.1f} / {t['optax'] / MIB:.1f}",
                f"{len(r['big_residuals']['jaxent'])} / "
                f"{len(r['big_residuals']['optax'])}",
                f"{_passes(r['passes']['jaxent'])} / {_passes(r['passes']['optax'])}",
                "yes" if r["agree"] else f"NO ({max(r['mismatch'].values()):.1e})",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def bars(results: list[dict]) -> list[str]:
    """The issue's bars, met or missed, for the cases that were run."""
    by_case = {r["case"]: r for r in results}
    lines = []
    for (case, peer), limit in BARS.items():
        if case in by_case:
            value = by_case[case]["ratio"][peer]
            verdict = "met" if value <= limit else "MISSED"
            lines.append(f"{case}: jaxent/{peer} {value:.2f} <= {limit}: {verdict}")
    slower = [
        f"{r['case']} (vs {peer} {r['ratio'][peer]:.2f})"
        for r in results
        for peer in ("optax", "reference")
        if r["ratio"][peer] > 1.0
    ]
    lines.append(
        "no case slower than optax or reference: "
        + ("met" if not slower else "MISSED: " + ", ".join(slower))
    )
    return lines


def plot(results: list[dict], path: Path, title: str) -> None:
    """Bar chart of the ratios: against optax and reference (top), against the
    memory floor (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    pos = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(8, 0.8 * len(names) + 2), 7), sharex=True
    )
    for i, peer in enumerate(("optax", "reference")):
        bars_ = top.bar(
            pos + (i - 0.5) * 0.4,
            [r["ratio"][peer] for r in results],
            0.4,
            label=f"jaxent / {peer}",
        )
        top.bar_label(bars_, fmt="%.2f", fontsize=6, padding=1)
    top.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    top.set_ylabel("time ratio (< 1: jaxent faster)")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    bars_ = bottom.bar(
        pos, [r["ratio"]["floor"] for r in results], 0.5, color="tab:green"
    )
    bottom.bar_label(bars_, fmt="%.2f", fontsize=6, padding=1)
    bottom.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    bottom.set_ylabel("jaxent / memory floor (x * 2)")
    bottom.set_xticks(pos, names, rotation=30, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    opts = parse_args(argv)
    info = machine()
    print(
        f"{info['device']} ({info['backend']}), {info['cpu']}, "
        f"os.cpu_count()={info['cpu_count']}; jax {info['jax']}, "
        f"optax {info['optax']}, jaxent {info['jaxent']}"
    )
    print("command: python -m benchmarks.run " + " ".join(sys.argv[1:]))
    out = Path(opts.out)
    report = {"machine": info, "argv": sys.argv[1:], "configs": []}
    failed = []
    cfgs = configs(opts)
    for n, c, dtype in cfgs:
        print(f"\n## {n} x {c} {dtype}, median of {opts.repeats} interleaved runs")
        results = []
        for name in opts.cases.split(","):
            r = run_case(_cases.CASES[name], n, c, dtype, opts)
            results.append(r)
            hbm = r["hbm_floor_ms"]
            print(
                f"  {name}: jaxent {r['ms']['jaxent']:.2f} ms, "
                + ", ".join(f"/{k} {v:.2f}" for k, v in r["ratio"].items())
                + (
                    ""
                    if hbm is None
                    else f", HBM floor {hbm:.2f} ms (x{r['ms']['jaxent'] / hbm:.2f})"
                ),
                flush=True,
            )
            if not r["agree"]:
                failed.append(f"{name} {n}x{c} {dtype}: mismatch {r['mismatch']}")
            if r["big_residuals"]["jaxent"]:
                found = r["big_residuals"]["jaxent"]
                failed.append(f"{name}: jaxent saves N x C residuals {found}")
            for peer, rows in (r["profile"] or {}).items():
                print(f"  {name} / {peer} kernels:")
                for kernel, t in rows:
                    print(f"    {kernel:48s} {t:8.2f} ms")
        print(table(results))
        print("\noptax peers:")
        for r in results:
            print(f"  {r['case']}: {r['title']}; optax: {r['optax_peer']}")
        if not opts.quick:  # the bars are about full-size timings
            print("\nbars (CPU figures of issue 5):")
            print("\n".join("  " + line for line in bars(results)))
        report["configs"].append({"n": n, "c": c, "dtype": dtype, "results": results})
        png = Path(opts.png) if opts.png else out / "results.png"
        if len(cfgs) > 1:
            png = png.with_name(f"{png.stem}_{n}x{c}_{dtype}{png.suffix}")
        title = (
            f"jaxent vs peers, jit(value_and_grad), mean, {n} x {c} {dtype}, "
            f"{info['device']} ({info['cpu_count']} CPUs)"
        )
        plot(results, png, title)
        print(f"chart: {png}")
        # Written after every configuration, so that a run cut short keeps
        # what it measured.
        json_path = Path(opts.json) if opts.json else out / "results.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        print(f"results: {json_path}")
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
