"""The documentation says what the code does.

1. Every ```python block of README.md and docs/*.md runs as written. The blocks
   of one file run in order in one namespace (a later block uses what an
   earlier one defined), in a fresh Python process with JAX's default
   configuration: this suite's float64, strict dtype promotion and fast XLA
   flags (tests/conftest.py) are what a reader does not have. An HTML comment
   on the line before a block's fence marks it: ``<!-- devices: 8 -->`` runs
   its page in a process with that many CPU devices
   (``--xla_force_host_platform_device_count``, as tests/test_sharded.py's
   subprocess does); ``<!-- not run: reason -->`` shows code that cannot run
   here (several hosts, PyTorch). Shell commands and pseudo-code are not
   ```python.
2. docs/api.md's "Arguments and formulas" table names every parameter of every
   public function, no other, positional and keyword-only as in the signature,
   with the same defaults where it gives one.
3. docs/pytorch.md's map from PyTorch to jaxent holds numerically (with torch
   installed).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from tests.helpers import FAST_XLA_FLAGS, assert_close

ROOT = Path(__file__).absolute().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)")
_MARK = re.compile(r"^<!--\s*(devices|not run):\s*(.*?)\s*-->$")


class Block(NamedTuple):
    path: str  # relative to the repository root
    line: int  # 1-based line of the first code line
    code: str
    devices: int  # 1 unless marked
    run: bool


def python_blocks(text: str, path: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with their markers."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        fence, lang = opening.groups()
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence[0] * len(fence))
            and not lines[end].strip().strip(fence[0])
        ):
            end += 1
        if lang == "python":
            previous = lines[i - 1].strip() if i else ""
            mark = _MARK.match(previous)
            devices = int(mark.group(2)) if mark and mark.group(1) == "devices" else 1
            run = not (mark and mark.group(1) == "not run")
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))  # list items
            blocks.append(Block(path, i + 2, code, devices, run))
        i = end + 1
    return blocks


def _doc_blocks(path: Path) -> list[Block]:
    return python_blocks(path.read_text(), str(path.relative_to(ROOT)))


_RUNNABLE = [p for p in DOC_FILES if any(b.run for b in _doc_blocks(p))]

# One process per device count (starting JAX is most of a small page's time).
# Each page gets a fresh namespace; its blocks are compiled with their first
# line at its line in the Markdown file, so a traceback points into the page.
_RUNNER = """
import json, sys, traceback
failures = []
for page in json.load(sys.stdin):
    namespace = {"__name__": "__main__"}
    print("==== running", page[0][0], flush=True)
    for path, line, code in page:
        try:
            exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
        except BaseException:
            failures.append(traceback.format_exc())
            break
if failures:
    sys.exit("\\n".join(failures))
"""


def _devices(path: Path) -> int:
    return max(b.devices for b in _doc_blocks(path) if b.run)


_DEVICE_COUNTS = sorted({_devices(p) for p in _RUNNABLE})


def test_python_blocks_are_found_with_their_markers():
    text = "\n".join(
        [
            "```bash",
            "pip install jaxent",
            "```",
            "<!-- devices: 8 -->",
            "```python",
            "x = 1",
            "```",
            "````python",
            "y = '```'",
            "````",
            "<!-- not run: two hosts -->",
            "```python",
            "z = 3",
            "```",
            "```text",
            "w = 4",
            "```",
            "- an item:",
            "",
            "  ```python",
            "  if True:",
            "      v = 5",
            "  ```",
        ]
    )
    assert python_blocks(text, "page.md") == [
        Block("page.md", 6, "x = 1", 8, True),
        Block("page.md", 9, "y = '```'", 1, True),
        Block("page.md", 13, "z = 3", 1, False),
        Block("page.md", 21, "if True:\n    v = 5", 1, True),
    ]


def test_the_pages_with_code_are_all_run():
    names = {str(p.relative_to(ROOT)) for p in _RUNNABLE}
    expected = {"README.md", "docs/index.md", "docs/scaling.md", "docs/pytorch.md"}
    assert expected <= names, names


@pytest.mark.first
@pytest.mark.parametrize(
    "devices",
    [
        pytest.param(n, marks=[pytest.mark.slow] if n > 1 else [])
        for n in _DEVICE_COUNTS
    ],
    ids=[f"{n}-device pages" for n in _DEVICE_COUNTS],
)
def test_python_blocks_run(devices):
    pages = [
        [[b.path, b.line, b.code] for b in _doc_blocks(path) if b.run]
        for path in _RUNNABLE
        if _devices(path) == devices
    ]
    # A reader's JAX: none of this suite's settings (platform choice aside).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "JAXENT_")) or k == "JAX_PLATFORMS"
    }
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_XLA_FLAGS]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(flags)
    # This checkout's jaxent, not an installed one.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(pages),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode:
        pytest.fail(proc.stdout + proc.stderr, pytrace=False)


# -- docs/api.md against the signatures ----------------------------------------

_API = ROOT / "docs" / "api.md"
_CALL = re.compile(r"`(\w+)\(([^`]*)\)`")
_ALIAS = re.compile(r"\(alias `(\w+)`\)")


def _documented_signatures() -> dict[str, str]:
    """``name -> parameter text`` from the first column of api.md's tables; an
    ``(alias `b`)`` after ``a(...)`` documents ``b`` with ``a``'s parameters."""
    found = {}
    for line in _API.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for call in _CALL.finditer(first):
            found.setdefault(call.group(1), call.group(2))
        for alias in _ALIAS.finditer(first):
            found.setdefault(alias.group(1), found[_CALL.search(first).group(1)])
    return found


def _parse_params(text: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``"a, b=1, *, c"`` -> positional names, keyword-only names (as dict
    keys), defaults as written."""
    positional, keyword, defaults = [], {}, {}
    star = False
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item == "*":
            star = True
            continue
        name, _, default = (s.strip() for s in item.partition("="))
        if default:
            defaults[name] = default
        if star:
            keyword[name] = default
        else:
            positional.append(name)
    return positional, keyword, defaults


_FUNCTIONS = sorted(
    name
    for name in jaxent.__all__
    if callable(getattr(jaxent, name)) and not inspect.isclass(getattr(jaxent, name))
)


@pytest.mark.parametrize("name", _FUNCTIONS)
def test_api_table_lists_every_parameter(name):
    documented = _documented_signatures()
    assert name in documented, (
        f"docs/api.md's table has no `{name}(...)` row (or alias note)"
    )
    positional, keyword, defaults = _parse_params(documented[name])
    params = inspect.signature(getattr(jaxent, name)).parameters.values()
    actual_pos = [p.name for p in params if p.kind != p.KEYWORD_ONLY]
    actual_kw = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
    problems = []
    if positional != actual_pos:
        problems.append(f"positional {positional}, signature has {actual_pos}")
    if missing := sorted(actual_kw - set(keyword)):
        problems.append(f"missing keyword-only {missing}")
    if extra := sorted(set(keyword) - actual_kw):
        problems.append(f"keyword-only {extra} not in the signature")
    signature = inspect.signature(getattr(jaxent, name)).parameters
    for param, text in defaults.items():
        if param in signature and ast.literal_eval(text) != signature[param].default:
            problems.append(
                f"{param}={text}, signature default {signature[param].default!r}"
            )
    assert not problems, f"docs/api.md, `{name}`: " + "; ".join(problems)


# -- docs/pytorch.md's map, checked against PyTorch ------------------------------


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch_with_weights_ignore_index_smoothing(
    label_smoothing,
):
    torch = _torch()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 7)) * 2
    labels = rng.integers(0, 7, size=12)
    labels[[2, 5, 11]] = -100
    weights = rng.uniform(0.2, 2.0, size=7)
    for reduction in ("mean", "sum", "none"):
        expected = torch.nn.functional.cross_entropy(
            torch.tensor(logits),
            torch.tensor(labels),
            weight=torch.tensor(weights),
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        actual = jaxent.softmax_cross_entropy_with_integer_labels(
            logits,
            labels,
            weights=weights,
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        assert_close(actual, expected.numpy())


def test_soft_label_cross_entropy_matches_torch_probability_targets():
    torch = _torch()
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(9, 6)) * 2
    labels = rng.dirichlet(np.ones(6), size=9)
    for reduction in ("mean", "sum", "none"):
        expected = torch.nn.functional.cross_entropy(
            torch.tensor(logits),
            torch.tensor(labels),
            label_smoothing=0.2,
            reduction=reduction,
        )
        actual = jaxent.softmax_cross_entropy(
            logits, labels, label_smoothing=0.2, reduction=reduction
        )
        assert_close(actual, expected.numpy())


def test_class_axis_1_matches_torch_layout():
    torch = _torch()
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 5, 4))  # PyTorch's [N, C, d1]
    labels = rng.integers(0, 5, size=(3, 4))
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels)
    )
    actual = jaxent.softmax_cross_entropy_with_integer_labels(
        logits, labels, axis=1, reduction="mean"
    )
    assert_close(actual, expected.numpy())


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_divergence_matches_torch_kldivloss_batchmean(log_target):
    torch = _torch()
    rng = np.random.default_rng(1)
    log_predictions = np.log(rng.dirichlet(np.ones(5), size=6))
    targets = rng.dirichlet(np.ones(5), size=6)
    given = np.log(targets) if log_target else targets
    expected = torch.nn.KLDivLoss(reduction="batchmean", log_target=log_target)(
        torch.tensor(log_predictions), torch.tensor(given)
    )
    kl = jaxent.kl_divergence_with_log_targets if log_target else jaxent.kl_divergence
    assert_close(jnp.mean(kl(log_predictions, given)), expected.numpy())


def test_zero_target_is_finite_where_torch_log_target_is_nan():
    """A zero target adds 0 (``0 log 0 = 0``) in both of jaxent's KL
    functions; torch's ``KLDivLoss(log_target=True)`` gives NaN for it."""
    torch = _torch()
    log_predictions = np.log([[0.2, 0.3, 0.5]])
    targets = np.array([[0.0, 0.4, 0.6]])
    with np.errstate(divide="ignore"):
        log_targets = np.log(targets)
    torch_kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    assert torch_kl(torch.tensor(log_predictions), torch.tensor(log_targets)).isnan()
    expected = np.sum(targets[:, 1:] * np.log(targets[:, 1:] / [[0.3, 0.5]]))
    assert_close(jaxent.kl_divergence(log_predictions, targets), [expected])
    assert_close(
        jaxent.kl_divergence_with_log_targets(log_predictions, log_targets),
        [expected],
    )


def test_sigmoid_binary_cross_entropy_matches_torch_pos_weight():
    torch = _torch()
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 3)) * 3
    labels = rng.uniform(size=(8, 3)).round()
    pos_weight = np.array([0.5, 2.0, 4.0])
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))(
        torch.tensor(logits), torch.tensor(labels)
    )
    actual = jaxent.sigmoid_binary_cross_entropy(
        logits, labels, pos_weight=pos_weight, reduction="mean"
    )
    assert_close(actual, expected.numpy())


def test_linear_head_matches_torch_lm_head_and_z_loss():
    """``weight = lm_head.weight.T``; ``z_loss`` adds ``z * lse**2`` per token
    to the mean (Liger's ``lse_square_scale``), recovered from ``return_aux``."""
    torch = _torch()
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(10, 6))
    embedding = rng.normal(size=(9, 6))  # lm_head.weight: [V, D]
    labels = rng.integers(0, 9, size=10)
    labels[[0, 7]] = -100
    logits = torch.tensor(hidden) @ torch.tensor(embedding).T
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    lse = torch.logsumexp(logits, -1)[torch.tensor(labels) != -100]
    z = 1e-2
    loss, aux = jaxent.linear_softmax_cross_entropy(
        hidden,
        embedding.T,
        labels,
        ignore_index=-100,
        z_loss=z,
        reduction="mean",
        return_aux=True,
    )
    assert_close(loss, (ce + z * (lse**2).mean()).numpy())
    counted = labels != -100
    assert_close(jnp.mean(aux.lse[counted] ** 2), (lse**2).mean().numpy())
    accuracy = (logits.argmax(-1) == torch.tensor(labels))[torch.tensor(counted)]
    assert np.mean(np.asarray(aux.argmax)[counted] == labels[counted]) == (
        accuracy.double().mean().item()
    )
