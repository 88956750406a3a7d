"""The examples' one plotting helper: labelled curves on one set of axes, saved
as a PNG (matplotlib's headless backend, so it runs where there is no display)."""

import matplotlib


def save_curves(path, curves, *, xlabel, ylabel, title, figsize=(6, 4)):
    """Saves ``curves`` to the PNG file ``path``.

    ``curves`` maps each legend label to ``(x, y)`` or ``(x, y, style)``, where
    ``style`` is a dict of keyword arguments for ``Axes.plot``.
    """
    # Chosen before pyplot is imported: CI has no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, (x, y, *style) in curves.items():
        ax.plot(x, y, label=label, **(style[0] if style else {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
