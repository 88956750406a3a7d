"""Sphinx configuration of the jaxent documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -E -W -n --keep-going -b html docs docs/_build/html

The API page is generated from the docstrings: the ``autoall`` directive defined
below documents every name in a module's ``__all__``, so a function added to
``jaxent.__all__`` appears without editing the pages. ``check_args`` fails the
build (under ``-W``) when a docstring's ``Args:`` names an argument the signature
does not have, or misses one it has.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import jaxent

project = "jaxent"
author = "the jaxent authors"
copyright = "the jaxent authors"
release = jaxent.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# Markdown pages: $...$ / $$...$$ math, \begin{align} blocks, and GitHub-style
# anchors for headings so that [text](page.md#some-heading) links resolve.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Docstrings are Google style (Args:/Returns:/Example:/Note:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_param = True
napoleon_use_rtype = False

autodoc_default_options = {"member-order": "bysource"}
# Signatures are rendered by ``short_signature`` below: the annotations as
# written in the source (``ArrayLike``, ``jax.Array``) instead of their
# expansion (``jax.typing.ArrayLike`` is a union of eight types).
autodoc_typehints = "signature"
TYPE_ALIASES = {"Axis": "int | Sequence[int] | None"}
autosummary_generate = False
add_module_names = True

# No intersphinx (the build runs offline): references to JAX objects
# (:func:`jax.nn.softmax`, the ``jax.Array`` annotations) are linked to the
# JAX documentation by ``link_jax`` below; standard-library types are shown
# unlinked.
nitpick_ignore_regex = [
    ("py:class", r"(collections\.abc\.)?(Sequence|Hashable)(\[.*\])?"),
]

html_theme = "sphinx_book_theme"
html_title = f"jaxent {release}"
html_theme_options = {"show_toc_level": 2}
html_static_path: list[str] = []
html_show_sourcelink = False

logger = logging.getLogger(__name__)
JAX_DOCS = "https://docs.jax.dev/en/latest/_autosummary/{}.html"
# Names the annotations resolve to, mapped to their public JAX names (a
# NamedTuple field typed ``jax.Array`` is documented as jaxlib's class).
JAX_NAMES = {
    "ArrayLike": "jax.typing.ArrayLike",
    "jax.jaxlib._jax.Array": "jax.Array",
}


class _Text:
    """An annotation that ``inspect`` prints as the given text."""

    def __init__(self, annotation) -> None:
        text = (
            annotation
            if isinstance(annotation, str)
            else inspect.formatannotation(annotation)
        )
        for alias, expansion in TYPE_ALIASES.items():
            text = re.sub(rf"\b{alias}\b", expansion, text)
        self.text = text

    def __repr__(self) -> str:
        return self.text


def short_signature(app, what, name, obj, options, signature, return_annotation):
    """Signature of a function with its annotations as written in the source."""
    if what != "function":
        return None
    sig = inspect.signature(obj)
    empty = inspect.Parameter.empty
    params = [
        p if p.annotation is empty else p.replace(annotation=_Text(p.annotation))
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    text = str(sig.replace(parameters=params, return_annotation=empty))
    return text, (None if ret is empty else repr(_Text(ret)))


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


class AutoAll(SphinxDirective):
    """``.. autoall:: module``: a summary table, then the autodoc entry of every
    name in ``module.__all__`` (submodules listed in ``__all__`` are skipped:
    document them with their own ``automodule``)."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        members = [
            (name, getattr(module, name))
            for name in module.__all__
            if not inspect.ismodule(getattr(module, name))
        ]
        lines = [f".. currentmodule:: {modname}", ""]
        lines += [".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {name}" for name, _ in members]
        lines.append("")
        for name, obj in members:
            lines += [f".. auto{_kind(obj)}:: {modname}.{name}", ""]
        return self.parse_text_to_nodes("\n".join(lines))


_PARAM = re.compile(r"^:param (?:[^:]*\s)?\*{0,2}(\w+):")


def check_args(app, what, name, obj, options, lines) -> None:
    """Warns when the documented arguments differ from the signature's.

    Runs after napoleon turned ``Args:`` into ``:param name:`` fields. A
    docstring without any ``Args:`` (the one-line ``jaxent.reference``
    docstrings that point to the documented function) is not checked.
    """
    if what != "function":
        return
    documented = [m.group(1) for line in lines if (m := _PARAM.match(line))]
    if not documented:
        return
    params = inspect.signature(obj).parameters
    actual = [
        p.name
        for p in params.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    extra = [a for a in documented if a not in actual]
    missing = [a for a in actual if a not in documented]
    # The summary table processes the same docstring again: warn once.
    if not (extra or missing) or name in _checked:
        return
    _checked.add(name)
    module = sys.modules.get(getattr(obj, "__module__", ""))
    location = (
        f"{module.__file__}:docstring of {obj.__module__}.{obj.__qualname__}"
        if module is not None and getattr(module, "__file__", None)
        else None
    )
    if extra:
        logger.warning(
            "%s: Args documents %s, not in the signature %s",
            name,
            ", ".join(extra),
            tuple(actual),
            type="jaxent",
            subtype="args",
            location=location,
        )
    if missing:
        logger.warning(
            "%s: Args does not document %s",
            name,
            ", ".join(missing),
            type="jaxent",
            subtype="args",
            location=location,
        )


_checked: set[str] = set()


def link_jax(app, env, node, contnode):
    """Resolves ``py`` references to public JAX objects (``jax.nn.softmax``,
    ``jax.Array``, ``jax.typing.ArrayLike``) to their page in the JAX docs."""
    target = node.get("reftarget", "")
    target = JAX_NAMES.get(target, target)
    if node.get("refdomain") != "py" or not target.startswith("jax."):
        return None
    modname, _, attr = target.rpartition(".")
    try:
        getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError):
        return None
    ref = nodes.reference("", "", internal=False, refuri=JAX_DOCS.format(target))
    ref.append(contnode)
    return ref


def setup(app):
    app.add_directive("autoall", AutoAll)
    # After napoleon (priority 500) has converted the Google sections.
    app.connect("autodoc-process-docstring", check_args, priority=900)
    app.connect("autodoc-process-signature", short_signature)
    app.connect("missing-reference", link_jax)
    return {"parallel_read_safe": True}
