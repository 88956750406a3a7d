"""Robustness figures: what the property and adversarial suites checked.

Runs ``tests/test_properties.py`` and ``tests/test_adversarial.py`` under pytest
with the recorder of ``tests/helpers.py`` switched on (every comparison the suites
make appends one JSON line), then prints from that log:

- cases run per function and dtype (random cases of the property suite, checks of
  the adversarial corpus);
- the largest error seen per dtype, in units of the tolerance table (1.0 = at
  the tolerance; the half-precision rule of "no farther than a naive same-dtype
  computation" is counted where it was needed);
- NaN/inf where a finite number was expected, split into tests that must pass
  (must be 0) and tests marked xfail for a known library bug;
- the bad-input kinds covered by the trace-time error tests.

The figures are the suites' own checks, not a separate computation. Exit status
is 1 when a test failed or a passing test saw an unexpected non-finite value.

Usage::

    python benchmarks/robustness_report.py                     # "ci" profile
    python benchmarks/robustness_report.py --profile thorough  # 33x the cases
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("tests/test_properties.py", "tests/test_adversarial.py")
DTYPES = ("float64", "float32", "float16", "bfloat16")


def run_suites(profile: str, log: Path, junit: Path) -> tuple[int, float]:
    env = dict(os.environ, JAXENT_ROBUSTNESS_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *SUITES,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--hypothesis-profile={profile}",
        f"--junit-xml={junit}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    print(f"pytest ({profile} profile): {' '.join(tail)}  [{elapsed:.0f} s]")
    if proc.returncode not in (0, 1):
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc.returncode, elapsed


def outcomes(junit: Path) -> dict[str, str]:
    """pytest node id -> "passed", "failed", "xfailed" or "skipped"."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{module}::{case.get('name')}"
        children = {child.tag: child for child in case}
        if "failure" in children or "error" in children:
            result[node] = "failed"
        elif "skipped" in children:
            skipped = children["skipped"]
            result[node] = (
                "xfailed" if "xfail" in skipped.get("type", "") else "skipped"
            )
        else:
            result[node] = "passed"
    return result


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        cells = [
            str(c).ljust(w) if j == 0 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def units(v):
    return "-" if v is None else f"{v:.3g}"


def report(records, status):
    print()
    print("Cases run per function and dtype")
    print("  property: random cases checked against the float64 NumPy reference")
    print("  (value and every gradient); adversarial: corpus checks")
    cases = collections.Counter()
    adversarial = collections.Counter()
    functions = set()
    for r in records:
        if r["event"] == "cases":
            cases[r["function"], r["dtype"]] += r["cases"]
            functions.add(r["function"])
        elif r["event"] == "adversarial":
            # Corpus names are "function", "function (detail)" or "function[...]".
            name = r["function"].split(" ")[0].split("[")[0]
            adversarial[name, r["dtype"]] += 1
    rows = []
    for fn in sorted(functions):
        per = [cases[fn, d] for d in DTYPES]
        adv = sum(v for (f, _), v in adversarial.items() if f == fn)
        rows.append([fn, *per, sum(per), adv])
    table(["function", *DTYPES, "property total", "adversarial"], rows)
    missing = [(f, d) for f in functions for d in DTYPES if cases[f, d] == 0]
    low = [f for f in functions if sum(cases[f, d] for d in DTYPES) < 2000]

    print()
    print("Largest error seen, in units of the tolerance (<= 1 passes)")
    worst = collections.defaultdict(lambda: None)
    fallbacks = collections.Counter()
    for r in records:
        if r["event"] == "check":
            key = ("property " + r["kind"], r["dtype"])
            fallbacks[r["dtype"]] += r["fallbacks"]
        elif r["event"] == "adversarial" and r["kind"] in ("value", "grad"):
            key = ("adversarial " + r["kind"], r["dtype"])
        elif r["event"] == "relation":
            key = ("identities", r["dtype"])
        else:
            continue
        if status.get(r["test"]) == "xfailed":
            continue  # known bugs are counted below, not in the accuracy figures
        worst[key] = max(worst[key] or 0.0, r["max_units"])
    kinds = (
        "property value",
        "property grad",
        "identities",
        "adversarial value",
        "adversarial grad",
    )
    table(
        ["dtype", *kinds, "naive-rule uses"],
        [[d, *(units(worst[k, d]) for k in kinds), fallbacks[d]] for d in DTYPES],
    )

    print()
    print("NaN/inf where a finite value was expected")
    bad = collections.Counter()
    for r in records:
        n = r.get("unexpected_nonfinite", 0) + r.get("mismatched_nonfinite", 0)
        if n:
            bad[status.get(r["test"], "unknown")] += n
    print(
        f"  in tests that must pass:            {bad['passed'] + bad['failed']}"
        f"  (must be 0)"
    )
    print(f"  in xfail tests (known bugs, notes): {bad['xfailed']}")

    print()
    print("Bad-input kinds covered (trace-time errors: type, argument, value)")
    kinds = collections.defaultdict(lambda: [set(), 0, 0])
    for r in records:
        if r["event"] == "bad_input":
            entry = kinds[r["kind"]]
            entry[0].add(r["function"])
            ok = status.get(r["test"]) == "passed"
            entry[1 if ok else 2] += 1
    table(
        ["kind", "functions", "passing", "known bug"],
        [[k, len(v[0]), v[1], v[2]] for k, v in sorted(kinds.items())],
    )

    counts = collections.Counter(status.values())
    print()
    print("Tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} failed tests")
    if bad["passed"] + bad["failed"]:
        problems.append("unexpected non-finite values")
    if missing:
        problems.append(f"functions/dtypes without cases: {missing}")
    if low:
        problems.append(f"fewer than 2,000 cases: {low}")
    print("Problems: " + ("; ".join(problems) if problems else "none"))
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", choices=["ci", "thorough"])
    parser.add_argument("--log", type=Path, help="keep the JSON-lines log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or Path(tmp) / "robustness.jsonl"
        log.unlink(missing_ok=True)
        junit = Path(tmp) / "junit.xml"
        run_suites(args.profile, log, junit)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        status = outcomes(junit)
    sys.exit(report(records, status))


if __name__ == "__main__":
    main()
