"""Where a result's ``plot`` draws: a new figure, a file, or the caller's axes.

matplotlib is optional (the ``plot`` extra), so it is imported here, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchcurv.errors import MissingExtraError


def plot_axes(path_or_ax: Any, what: str, figsize: tuple[float, float] = (6.0, 3.6)) -> Any:
    """The ``Axes`` to draw into: the caller's, or one of a new figure for ``None`` or a path.

    A new figure is a bare ``matplotlib.figure.Figure`` (no pyplot), so plotting from a
    script, a notebook or a server process never touches global figure state.
    ``what`` names the caller in the :class:`~torchcurv.MissingExtraError` raised without
    matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingExtraError("matplotlib", "plot", what) from err
    if path_or_ax is None or isinstance(path_or_ax, (str, Path)):
        return Figure(figsize=figsize, layout="constrained").add_subplot()
    return path_or_ax


def finish_plot(ax: Any, path_or_ax: Any) -> Any:
    """Write the figure to ``path_or_ax`` if it is a path (returned as a ``Path``), else
    return ``ax``."""
    if isinstance(path_or_ax, (str, Path)):
        ax.figure.savefig(path_or_ax, dpi=200)
        return Path(path_or_ax)
    return ax
