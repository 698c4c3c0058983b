"""Plots of training logs and pruning results (matplotlib, Agg backend, files written atomically)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from minitron.io.files import current_umask

log = logging.getLogger(__name__)

__all__ = ["plot_loss_curves", "save_figure"]

PathLike = Union[str, os.PathLike]


def save_figure(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _draw(ax: Any, hist: Sequence[Dict[str, Any]], title: str) -> bool:
    tr = [(r["step"], r["loss"]) for r in hist if r.get("type") == "train" and "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in hist if r.get("type") == "eval" and "eval_loss" in r]
    if not tr and not ev:
        return False
    handles = []
    if tr:
        handles += ax.plot(*zip(*tr), lw=1.0, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if ev:
        # evaluation is the LM loss, on another scale than e.g. a KL training loss: own axis
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*ev), "o-", ms=3, color="tab:orange", label="eval LM loss")
        ax2.set_ylabel("eval LM loss")
    ax.set_title(title)
    ax.legend(handles=handles, loc="upper right")
    return True


def plot_loss_curves(
    history: Sequence[Dict[str, Any]],
    path: PathLike,
    *,
    title: str = "training loss",
    extra: Optional[Dict[str, Sequence[Dict[str, Any]]]] = None,
) -> Optional[Path]:
    """Plot training loss (and evaluation LM loss, on a second axis) against the step.

    Args:
        history: log records ``{"type": "train"|"eval", "step": int, "loss"/"eval_loss": float}``.
        path: the PNG to write (atomically).
        title: title of the ``history`` panel.
        extra: more named histories, one panel each below (e.g. teacher correction and students).

    Returns:
        The path written, or None when there was nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series: List[Tuple[str, Sequence[Dict[str, Any]]]] = ([(title, history)] if history else []) + list(
        (extra or {}).items()
    )
    series = [(name, h) for name, h in series if any(r.get("type") in ("train", "eval") for r in h)]
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 3.2 * len(series)), squeeze=False)
    try:
        for ax, (name, hist) in zip(axes[:, 0], series):
            _draw(ax, hist, name)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)
