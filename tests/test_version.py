"""``jaxent.__version__``: the version pyproject.toml declares, read from the
installed package's metadata."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jaxent

ROOT = Path(__file__).resolve().parent.parent


def declared_version():
    """The ``version`` of pyproject.toml's ``[project]`` table (a regex: tomllib
    is 3.11+ only)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE).group(1)


def test_version_is_pyprojects():
    declared = declared_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", declared), declared
    # Metadata is written at install time: an editable install made before a
    # version bump reports the old version until it is reinstalled.
    assert jaxent.__version__ == declared, (
        f"jaxent.__version__ is {jaxent.__version__!r}, pyproject.toml declares "
        f"{declared!r}: reinstall the package (pip install -e .)"
    )


def test_version_without_metadata_is_unknown():
    # A fresh process where the package metadata cannot be found, as when the
    # source tree is imported without having been installed.
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import jaxent\n"
        "print(jaxent.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "0+unknown"
