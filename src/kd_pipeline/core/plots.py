"""Loss-curve plots and data of training runs, from a run's log history (`{"log_history": [...]}`
or the list itself): the training-curves figure (also the student folder's `loss_curve.png`),
the KD+SFT vs SFT-only overlay, and the `held_out_loss.csv` series for `dvc plots`."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from kd_pipeline.core.atomic import atomic_path, write_bytes_atomic

# Log-history keys that are bookkeeping, not curves.
_NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
               "eval_steps_per_second"}


def log_history(summary: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """The list of logged entries of a distill summary (`{"log_history": [...]}`) or a list."""
    if isinstance(summary, Mapping):
        for key in ("log_history", "history"):
            if isinstance(summary.get(key), list):
                return [dict(entry) for entry in summary[key] if isinstance(entry, Mapping)]
        raise ValueError(f"distill summary has no 'log_history' list (keys: {sorted(summary)})")
    return [dict(entry) for entry in summary if isinstance(entry, Mapping)]


def curves(summary) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` for every finite numeric key of the log history."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history(summary):
        step = entry.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in entry.items():
            if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series.setdefault(key, []).append((int(step), float(value)))
    return series


def _is_loss(key: str) -> bool:
    name = key.rsplit("/", 1)[-1].removeprefix("eval_").removeprefix("train_")
    return "loss" in name or name in ("total", "kd", "sft") or name.endswith(("_kd", "_sft"))


def _is_eval(key: str) -> bool:
    return key.startswith(("eval_", "eval/"))


def held_out_loss_key(series: Mapping[str, Any]) -> str | None:
    """The held-out curve that means the same in every run: the label cross-entropy `eval_sft`
    (logged whatever the loss weights), else `eval_loss`, else the first eval loss-like key.

    `eval_loss` itself is the weighted training objective (`kd_w * kd + sft_w * sft`), a
    different quantity in a KD+SFT run and an SFT-only run, so it is not what to compare.
    """
    for key in ("eval_sft", "eval_loss"):
        if key in series:
            return key
    return next((key for key in sorted(series) if _is_eval(key) and _is_loss(key)), None)


def train_loss_key(series: Mapping[str, Any]) -> str | None:
    """The train-side counterpart of `held_out_loss_key`: `sft`, else `loss`, else a loss-like key."""
    for key in ("sft", "loss"):
        if key in series:
            return key
    return next((key for key in sorted(series) if not _is_eval(key) and _is_loss(key)), None)


def _new_figure(nrows: int, width: float = 7.0, height: float = 3.2):
    # Figure + Agg canvas directly: no pyplot, no global backend state, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(nrows, 1, 1)]
    axes += [figure.add_subplot(nrows, 1, row + 1, sharex=axes[0]) for row in range(1, nrows)]  # one step axis
    return figure, axes


def _save_png(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def training_panels(series: Mapping[str, Any]) -> list[tuple[str, list[str], list[str]]]:
    """`(panel, left-axis keys, right-axis keys)` of the training-curves figure.

    `loss` is HF's name for our `total` (the same numbers), so it is drawn only when `total`
    is absent; the KD term (a KL, often ten times smaller than the cross-entropy) gets its own
    right-hand axis, so that its decrease is visible next to the SFT term.
    """
    def loss_keys(held_out: bool) -> tuple[list[str], list[str]]:
        keys = sorted(key for key in series if _is_loss(key) and _is_eval(key) == held_out)
        prefix = "eval_" if held_out else ""
        if f"{prefix}total" in keys and f"{prefix}loss" in keys:
            keys.remove(f"{prefix}loss")
        kd = [key for key in keys if key.rsplit("/", 1)[-1].removeprefix("eval_") == "kd"]
        return [key for key in keys if key not in kd], kd

    panels = [("train loss", *loss_keys(False)), ("held-out loss", *loss_keys(True)),
              ("learning rate", [key for key in ("learning_rate", "lr") if key in series], [])]
    return [panel for panel in panels if panel[1] or panel[2]] or [("(no curves logged)", [], [])]


def training_curves_figure(summary, title: str = "training curves"):
    """The training-curves figure: train and held-out loss terms (KD on a right-hand axis) and
    the learning rate, against integer optimizer steps."""
    from matplotlib.ticker import MaxNLocator

    series = curves(summary)
    panels = training_panels(series)
    figure, axes = _new_figure(len(panels))
    for ax, (name, left, right) in zip(axes, panels):
        handles = []
        for key in left:
            steps, values = zip(*series[key])
            handles += ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if right:
            twin = ax.twinx()
            for key in right:
                steps, values = zip(*series[key])
                handles += twin.plot(steps, values, "--", color="tab:red", marker="o" if len(steps) < 30 else None,
                                     markersize=3, label=f"{key} (right axis)")
            twin.set_ylabel(f"{name.split()[0]} KD")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if handles:
            ax.legend(handles=handles, fontsize=8)
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    return figure


def plot_training_curves(summary, path: str | os.PathLike, title: str = "training curves") -> Path:
    """One PNG: `training_curves_figure`."""
    return _save_png(training_curves_figure(summary, title), Path(path))


def plot_comparison(summaries: Mapping[str, Any], path: str | os.PathLike,
                    title: str = "KD+SFT vs SFT-only") -> Path:
    """One PNG overlaying runs (`label -> summary`): held-out (top) and train (bottom) label
    cross-entropy, the quantity both kinds of run share (see `held_out_loss_key`)."""
    figure, (eval_ax, train_ax) = _new_figure(2)
    for label, summary in summaries.items():
        series = curves(summary)
        for ax, key in ((eval_ax, held_out_loss_key(series)), (train_ax, train_loss_key(series))):
            if key is not None:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=f"{label} ({key})")
    from matplotlib.ticker import MaxNLocator

    for ax, name in ((eval_ax, "held-out CE"), (train_ax, "train CE")):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    eval_ax.set_title(title)
    train_ax.set_xlabel("optimizer step")
    return _save_png(figure, Path(path))


def write_curve_csv(summary, path: str | os.PathLike) -> Path:
    """`step,held_out_loss` rows (the `held_out_loss_key` curve): a data series that
    `dvc plots diff` overlays across experiments."""
    series = curves(summary)
    key = held_out_loss_key(series)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "held_out_loss"])
    for step, value in series.get(key, []) if key else []:
        writer.writerow([step, repr(value)])
    path = Path(path)
    write_bytes_atomic(path, out.getvalue().encode())
    return path


def plot_loss_curves(summary, out_dir: str | os.PathLike, comparison: Mapping[str, Any] | None = None,
                     title: str = "training curves") -> list[Path]:
    """The loss-curve files of one run, written into `out_dir`.

    Args:
        summary: this run's distill summary (`{"log_history": [...]}` or the list itself).
        out_dir: directory for the files (created).
        comparison: `label -> summary` of the runs to overlay (e.g. `{"KD+SFT": ..., "SFT-only": ...}`);
            the overlay is drawn only when it holds at least two runs.
        title: title of the training-curves figure.

    Returns:
        The PNG paths: `training_curves.png`, plus `kd_vs_sft.png` when compared.
        (`held_out_loss.csv` is written beside them for DVC data plots; it is not in the list.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_training_curves(summary, out_dir / "training_curves.png", title=title)]
    write_curve_csv(summary, out_dir / "held_out_loss.csv")
    if comparison is not None and len(comparison) >= 2:
        paths.append(plot_comparison(comparison, out_dir / "kd_vs_sft.png"))
    return paths
