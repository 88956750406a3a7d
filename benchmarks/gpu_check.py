"""Every GPU check of the fused linear cross-entropy, in one command.

1. **tests**: ``pytest tests/test_linear_pallas.py tests/test_linear.py`` with
   ``JAXENT_TEST_LINEAR_IMPLEMENTATION=pallas``, so that both files run the
   Triton kernels compiled (not interpreted) on the device;
2. **bench**: ``benchmarks/linear_ce.py --gpu``: the Pallas path, the XLA path,
   materialized logits + optax and the three bare matmuls, side by side at the
   Llama-3-8B and Gemma-2-2B heads in bfloat16, with temp memory, errors and the
   ``filter_eps`` measurement.

Each test file and the benchmark run in subprocesses with their own time
limits (130 s per test file, 300 s for the benchmark: under the 600 s a device
command may take), and the figures are written to ``$OUT/gpu_check.json``
(``OUT`` defaults to ``./out``) after each step, so a step that runs out of
time still leaves the others' results; the benchmark writes after each shape.
Each step's output is in ``$OUT/<step>.log``, the pytest reports in
``$OUT/<test file>.xml``.

Usage::

    python benchmarks/gpu_check.py                 # on a GPU: everything, ~9 min
    python benchmarks/gpu_check.py --parts tests --tests-timeout 270   # or split
    python benchmarks/gpu_check.py --parts bench --bench-timeout 560 --pallas-sweep
    python benchmarks/gpu_check.py --dry-run       # CPU: the plumbing, toy sizes

``--dry-run`` runs a few fast tests and the GPU benchmark code at toy sizes
(the kernels interpreted), so the script can be checked on a CPU-only machine.
The exit status is 0 when every part finished and the tests passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_linear_pallas.py", "tests/test_linear.py"]
# --dry-run's tests: lowering and argument checks, seconds on a CPU.
DRY_TESTS = ["-k", "lowers or unsupported or tile_is_chosen or bad_input"]


def run(cmd, env, timeout, log: Path) -> dict:
    """Runs ``cmd``, teeing its output to ``log``; returns status and time."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    text = log.read_text()
    print(text[-6000:], flush=True)
    return {
        "cmd": cmd,
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def junit_summary(path: Path) -> dict:
    """Counts and the failing test ids of a pytest JUnit report."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tests,bench", help="tests,bench")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check")
    parser.add_argument("--tests-timeout", type=int, default=130, help="per file")
    parser.add_argument("--bench-timeout", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pallas-sweep", action="store_true")
    parser.add_argument("--configs", default="", help="benchmark configs")
    args = parser.parse_args()

    out_dir = Path(os.environ.get("OUT") or "out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "gpu_check.json"
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "dry_run": args.dry_run,
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def save():
        report_path.write_text(json.dumps(report, indent=1, default=str))

    probe = subprocess.run(
        [sys.executable, "-c", "import jax; d = jax.devices()[0]; "
         "print(jax.__version__, d.platform, d.device_kind, sep='|')"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    report["device"] = probe.stdout.strip() or probe.stderr[-2000:]
    print("device:", report["device"], flush=True)
    save()

    ok = True
    parts = args.parts.split(",")
    if "tests" in parts:
        # One pytest per file, each with its own time limit, the kernels' own
        # file first: a slow second file cannot cost the first one's report.
        test_env = dict(env, JAXENT_TEST_LINEAR_IMPLEMENTATION="pallas")
        report["tests"] = {}
        for path in TESTS:
            stem = Path(path).stem
            xml = out_dir / f"{stem}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs"]
            cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}", "--durations=10"]
            # One process on one GPU; the device image has no pytest-xdist.
            cmd += ["-o", "addopts=-ra"]
            cmd += [path] + (DRY_TESTS if args.dry_run else [])
            result = run(cmd, test_env, args.tests_timeout, out_dir / f"{stem}.log")
            result["summary"] = junit_summary(xml)
            report["tests"][stem] = result
            ok &= result["returncode"] == 0
            save()
    if "bench" in parts:
        bench_json = out_dir / "linear_ce.json"
        cmd = [sys.executable, "benchmarks/linear_ce.py", "--gpu"]
        cmd += ["--json", str(bench_json), "--repeats", str(args.repeats)]
        if args.dry_run:
            cmd += ["--small", "--repeats", "2"]
        if args.pallas_sweep:
            cmd.append("--pallas-sweep")
        if args.configs:
            cmd += ["--configs", args.configs]
        result = run(cmd, env, args.bench_timeout, out_dir / "bench.log")
        if bench_json.exists():
            result["figures"] = json.loads(bench_json.read_text())
        report["bench"] = result
        ok &= result["returncode"] == 0
        save()
    report["ok"] = bool(ok)
    save()
    print(f"wrote {report_path} (ok={ok})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
