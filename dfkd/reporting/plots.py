"""Figures of a distillation run: sample grids, class histograms, embeddings, curves, confusion.

Every function takes plain tensors / arrays (images are float NCHW in [0, 1]), writes one PNG
atomically (a temporary file in the same directory, then ``os.replace``), closes its figure
and returns the PNG's :class:`~pathlib.Path`. Matplotlib runs on the non-interactive Agg
backend, so the functions work on headless machines and in worker processes.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from teachers.files import atomic_write

#: metrics.csv columns that are bookkeeping, not curves.
BOOKKEEPING_COLUMNS = ("step", "seconds", "lr", "images_synthesized")
#: metrics.csv columns drawn together in the evaluation panel.
EVALUATION_COLUMNS = ("student_accuracy", "agreement")


# -- helpers ----------------------------------------------------------------------------------
def _pyplot():
    """Pyplot on the Agg backend (safe without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically (:func:`teachers.files.atomic_write`), close
    it and return the path."""
    plt = _pyplot()
    try:
        return atomic_write(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _numpy(values, dtype=None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    return array.astype(dtype) if dtype is not None else array


def _names(class_names, num_classes: int) -> list[str]:
    """Class names, padded with indices where fewer names than classes are known."""
    names = [str(name) for name in (class_names or [])]
    return names + [str(k) for k in range(len(names), num_classes)]


def _class_colors(num_classes: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "hsv")
    if num_classes > 20:
        return [cmap(k / num_classes) for k in range(num_classes)]
    return [cmap(k) for k in range(num_classes)]


# -- sample grids -----------------------------------------------------------------------------
def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """NCHW images in [0, 1] as 3-channel images (grayscale repeated, so it shows as gray)."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    channels = images.shape[1]
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 3:
        return images
    return images[:, :1].expand(-1, 3, -1, -1)  # unusual channel counts: show the first one


def _class_rows(labels: torch.Tensor, num_classes: int, per_class: int, score=None) -> list[list[int]]:
    """For each class, the indices of up to ``per_class`` items with that label, by descending score."""
    rows = []
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()
        if score is not None and idx.numel():
            idx = idx[torch.argsort(score[idx], descending=True, stable=True)]
        rows.append(idx[:per_class].tolist())
    return rows


def _panel(ax, images: torch.Tensor, rows: list[list[int]], per_class: int, captions=None, names=None):
    """Draw one grid panel (one row per class) with ``make_grid``; caption tiles above them."""
    from torchvision.utils import make_grid

    _, _, height, width = images.shape
    pad = max(2, round(0.35 * height))
    blank = torch.ones(3, height, width)
    tiles = []
    for row in rows:
        tiles += [images[row[j]] if j < len(row) else blank for j in range(per_class)]
    grid = make_grid(torch.stack(tiles), nrow=per_class, padding=pad, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    fontsize = max(3.0, min(7.0, 70.0 / max(per_class, 1)))
    for r, row in enumerate(rows):
        for c, i in enumerate(row):
            if captions is not None:
                x = c * (width + pad) + pad + width / 2
                y = r * (height + pad) + pad / 2
                ax.text(x, y, captions[i], ha="center", va="center", fontsize=fontsize)
    ax.set_yticks([r * (height + pad) + pad + height / 2 for r in range(len(rows))])
    ax.set_yticklabels(names if names is not None else [""] * len(rows), fontsize=max(4.0, fontsize + 1))
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_samples(images, teacher_logits, class_names, path, per_class: int = 8, real_images=None, real_labels=None) -> Path:
    """Synthesized images grouped by the teacher's predicted class, one row per class.

    Each row holds up to ``per_class`` images the teacher assigns to that class, the most
    confident first; empty slots stay blank. Every tile is captioned with the predicted class
    name and the teacher's softmax confidence ("Coat 0.97"). With ``real_images`` and
    ``real_labels`` a second panel beside it shows real images of each class in the same
    layout. Grayscale images are drawn gray, 3-channel images as RGB.
    """
    plt = _pyplot()
    images = _to_rgb(torch.as_tensor(images))
    probs = torch.as_tensor(teacher_logits).detach().float().cpu().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    names = _names(class_names, probs.shape[1])
    num_classes = probs.shape[1]
    rows = _class_rows(predicted, num_classes, per_class, score=confidence)
    captions = [f"{names[int(p)]} {float(c):.2f}" for p, c in zip(predicted, confidence)]

    with_real = real_images is not None and real_labels is not None
    panels = 2 if with_real else 1
    tile_in = min(1.0, 40.0 / max(num_classes, 1))
    fig, axes = plt.subplots(1, panels, figsize=(panels * per_class * tile_in + 1.5, num_classes * tile_in + 0.8), squeeze=False)
    _panel(axes[0, 0], images, rows, per_class, captions, names)
    axes[0, 0].set_title(f"Synthesized ({images.shape[0]} images, by teacher prediction)", fontsize=9)
    if with_real:
        real = _to_rgb(torch.as_tensor(real_images))
        real_rows = _class_rows(torch.as_tensor(real_labels).cpu().long(), num_classes, per_class)
        _panel(axes[0, 1], real, real_rows, per_class, names=names)
        axes[0, 1].set_title("Real test images (by label)", fontsize=9)
    return _save(fig, path)


# -- class histogram --------------------------------------------------------------------------
def plot_class_histogram(predictions, class_names, path) -> Path:
    """Bar chart of the teacher's predicted classes on synthesized data.

    A dashed line marks the uniform expectation ``N / K``; the title gives the class balance
    (normalised entropy, :func:`dfkd.reporting.quality.class_balance`).
    """
    from dfkd.reporting.quality import class_balance

    plt = _pyplot()
    predictions = torch.as_tensor(predictions).detach().cpu().long().flatten()
    num_classes = max(len(class_names or []), int(predictions.max()) + 1 if predictions.numel() else 1)
    names = _names(class_names, num_classes)
    counts = torch.bincount(predictions, minlength=num_classes).numpy()
    balance = class_balance(predictions, num_classes) if predictions.numel() else 0.0

    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * num_classes + 2), 3.8))
    ax.bar(range(num_classes), counts, color=_class_colors(num_classes), edgecolor="black", linewidth=0.5)
    ax.axhline(predictions.numel() / num_classes, color="black", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(range(num_classes))
    ax.set_xticklabels(names, rotation=45 if num_classes > 5 else 0, ha="right" if num_classes > 5 else "center", fontsize=8)
    ax.set_ylabel("synthesized images")
    ax.set_title(f"Teacher predictions on {predictions.numel()} synthesized images (class balance {balance:.3f})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


# -- embedding --------------------------------------------------------------------------------
def _subsample(features, labels, max_points: int, rng: np.random.Generator):
    features = _numpy(features, np.float64)
    features = features.reshape(features.shape[0], -1)
    labels = _numpy(labels).astype(np.int64).reshape(-1)
    if features.shape[0] > max_points:
        keep = np.sort(rng.choice(features.shape[0], max_points, replace=False))
        features, labels = features[keep], labels[keep]
    return features, labels


def _embed_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """A 2-D embedding of ``features`` with sklearn's PCA or t-SNE (padded if fewer dims)."""
    n, d = features.shape
    if method == "pca":
        from sklearn.decomposition import PCA

        components = min(2, n, d)
        out = PCA(n_components=components, random_state=seed).fit_transform(features)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        if n < 3:
            raise ValueError("t-SNE needs at least 3 points")
        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    else:
        raise ValueError(f"unknown embedding method {method!r}; known: 'pca', 'tsne'")
    if out.shape[1] < 2:
        out = np.concatenate([out, np.zeros((n, 2 - out.shape[1]))], axis=1)
    return out


def plot_embedding(real_features, real_labels, synth_features, synth_labels, class_names, path, method: str = "pca", max_points: int = 2000, seed: int = 0) -> Path:
    """2-D embedding of real and synthesized feature vectors, coloured by class.

    PCA or t-SNE (``method``) is fitted on both sets together (each subsampled to at most
    ``max_points`` with ``seed``); real points are dots, synthesized points crosses. Real
    points are coloured by their label, synthesized ones by ``synth_labels`` (usually the
    teacher's prediction). ``real_features`` may be ``None`` to show synthesized data alone.
    """
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    synth, synth_y = _subsample(synth_features, synth_labels, max_points, rng)
    if real_features is not None:
        real, real_y = _subsample(real_features, real_labels, max_points, rng)
    else:
        real, real_y = np.zeros((0, synth.shape[1])), np.zeros(0, dtype=np.int64)
    points = _embed_2d(np.concatenate([real, synth]), method, seed)
    real_2d, synth_2d = points[: len(real)], points[len(real) :]
    num_classes = max(len(class_names or []), int(max(real_y.max(initial=-1), synth_y.max(initial=-1))) + 1)
    names, colors = _names(class_names, num_classes), _class_colors(num_classes)

    fig, ax = plt.subplots(figsize=(7.5, 6))
    for k in range(num_classes):
        if (real_y == k).any():
            ax.scatter(*real_2d[real_y == k].T, s=8, marker="o", color=colors[k], alpha=0.45, linewidths=0)
        if (synth_y == k).any():
            ax.scatter(*synth_2d[synth_y == k].T, s=22, marker="x", color=colors[k], alpha=0.9, linewidths=1)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="s", linestyle="", color=colors[k], label=names[k]) for k in range(num_classes)]
    handles += [
        Line2D([], [], marker="o", linestyle="", color="gray", label="real"),
        Line2D([], [], marker="x", linestyle="", color="gray", label="synthesized"),
    ]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 if len(handles) <= 24 else 2)
    label = "PCA" if method == "pca" else "t-SNE"
    ax.set_xlabel(f"{label} 1")
    ax.set_ylabel(f"{label} 2")
    ax.set_title(f"Teacher features, {label}: {len(real)} real (o), {len(synth)} synthesized (x)", fontsize=10)
    return _save(fig, path)


# -- curves -----------------------------------------------------------------------------------
def _read_metrics(metrics_csv) -> dict[str, np.ndarray]:
    """The numeric columns of a metrics CSV as float arrays (empty cells become NaN)."""
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, np.ndarray] = {}
    for name in rows[0].keys() if rows else []:
        values = []
        for row in rows:
            cell = (row.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                break  # not a numeric column
        else:
            if not all(math.isnan(v) for v in values):
                columns[name] = np.asarray(values, dtype=np.float64)
    return columns


def curve_columns(columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split metric column names into (loss terms, evaluation metrics) to draw."""
    losses = [c for c in columns if c not in BOOKKEEPING_COLUMNS and c not in EVALUATION_COLUMNS]
    evaluation = [c for c in EVALUATION_COLUMNS if c in columns]
    return losses, evaluation


def _plot_series(ax, x, y, label=None):
    ok = ~np.isnan(y)
    ax.plot(x[ok], y[ok], marker="o" if ok.sum() <= 25 else None, markersize=3, linewidth=1.2, label=label)


def plot_curves(metrics_csv, path) -> Path:
    """Training curves from ``metrics.csv``: one subplot per loss term, one for evaluation.

    Every numeric column except ``step, seconds, lr, images_synthesized`` is a curve against
    ``step``; ``student_accuracy`` and ``agreement`` share the last subplot. Points are marked
    when there are few, so a CSV with a single row still shows its values.
    """
    plt = _pyplot()
    columns = _read_metrics(metrics_csv)
    losses, evaluation = curve_columns(list(columns))
    n_rows = len(next(iter(columns.values()))) if columns else 0
    step = columns.get("step", np.arange(n_rows, dtype=np.float64))
    panels = [[name] for name in losses] + ([evaluation] if evaluation else [])
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 2.5))
        ax.text(0.5, 0.5, f"no curves in {Path(metrics_csv).name}", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, names in zip(axes.flat, panels):
        for name in names:
            _plot_series(ax, step, columns[name], label=name)
        ax.set_title(names[0] if len(names) == 1 else "evaluation on real test data", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


# -- confusion --------------------------------------------------------------------------------
def plot_confusion(confusion, class_names, path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with counts.

    Cell colour is the fraction of the row (recall on the diagonal); the text is the raw
    count. Rows without examples stay zero.
    """
    plt = _pyplot()
    counts = _numpy(confusion, np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion must be a square (k x k) matrix, got shape {counts.shape}")
    k = counts.shape[0]
    names = _names(class_names, k)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if k <= 30:
        fontsize = max(4.0, min(8.0, 120.0 / k))
        for i in range(k):
            for j in range(k):
                color = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(round(counts[i, j]))}", ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / counts.sum() if counts.sum() else 0.0
    ax.set_title(f"Student confusion on real test data (accuracy {accuracy:.3f})", fontsize=10)
    return _save(fig, path)
