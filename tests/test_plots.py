"""Every plot writes a valid, non-blank PNG atomically; grouping and CSV parsing behave."""
import numpy as np
import pytest
import torch

from dfkd.reporting import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress"]


def assert_png(path, tmp_path):
    """A PNG file that matplotlib can read, with visible content, and no temp files left."""
    import matplotlib.image as mpimg

    assert path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert float(np.var(pixels[..., :3])) > 1e-3, "the image is blank"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def _logits(n, k=4, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_plot_samples_grayscale_with_real_panel(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(30, 1, 8, 8, generator=gen)
    real = torch.rand(12, 1, 8, 8, generator=gen)
    real_labels = torch.arange(12) % 4
    path = plots.plot_samples(images, _logits(30), CLASSES, tmp_path / "samples.png", per_class=5, real_images=real, real_labels=real_labels)
    assert path == tmp_path / "samples.png"
    assert_png(path, tmp_path)


def test_plot_samples_rgb_with_empty_classes(tmp_path):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    logits = torch.zeros(6, 4)
    logits[:, 2] = 5.0  # every image predicted "Pullover": three rows stay blank
    path = plots.plot_samples(images, logits, CLASSES, tmp_path / "rgb.png", per_class=4)
    assert_png(path, tmp_path)


def test_class_rows_groups_by_class_most_confident_first():
    labels = torch.tensor([1, 0, 1, 1, 3])
    score = torch.tensor([0.2, 0.9, 0.8, 0.5, 0.4])
    rows = plots._class_rows(labels, 4, per_class=2, score=score)
    assert rows == [[1], [2, 3], [], [4]]


def test_plot_class_histogram(tmp_path):
    predictions = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    assert_png(plots.plot_class_histogram(predictions, CLASSES, tmp_path / "classes.png"), tmp_path)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_embedding(tmp_path, method):
    gen = torch.Generator().manual_seed(2)
    real_labels = torch.arange(40) % 4
    real = torch.randn(40, 6, generator=gen) + real_labels[:, None].float() * 2
    synth = torch.randn(30, 6, generator=gen)
    synth_labels = torch.arange(30) % 4
    path = plots.plot_embedding(real, real_labels, synth, synth_labels, CLASSES, tmp_path / f"emb_{method}.png", method=method, max_points=25)
    assert_png(path, tmp_path)


def test_plot_embedding_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="pca"):
        plots.plot_embedding(torch.randn(5, 3), torch.zeros(5), torch.randn(5, 3), torch.zeros(5), ["a"], tmp_path / "x.png", method="umap")


def _write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_plot_curves_several_rows(tmp_path):
    csv_path = _write_csv(
        tmp_path / "metrics.csv",
        "step,seconds,kd,adv,lr,images_synthesized,student_accuracy,agreement\n"
        "10,1.0,2.0,0.5,0.1,100,0.2,0.3\n"
        "20,2.0,1.5,,0.1,200,0.4,0.5\n"
        "30,3.0,1.0,0.3,0.05,300,0.6,0.7\n",
    )
    assert_png(plots.plot_curves(csv_path, tmp_path / "curves.png"), tmp_path)


def test_plot_curves_single_row(tmp_path):
    csv_path = _write_csv(tmp_path / "metrics.csv", "step,seconds,kd,lr,images_synthesized,student_accuracy,agreement\n5,0.1,0.7,0.1,64,0.25,0.5\n")
    assert_png(plots.plot_curves(csv_path, tmp_path / "curves.png"), tmp_path)


def test_curve_columns_treats_every_other_numeric_column_as_a_curve(tmp_path):
    csv_path = _write_csv(tmp_path / "m.csv", "step,seconds,bn,oh,note,lr,images_synthesized,student_accuracy\n1,0.1,2,3,hello,0.1,8,0.5\n")
    columns = plots._read_metrics(csv_path)
    assert "note" not in columns
    assert plots.curve_columns(list(columns)) == (["bn", "oh"], ["student_accuracy"])


def test_plot_confusion_with_empty_row(tmp_path):
    confusion = [[5, 1, 0, 0], [0, 0, 0, 0], [2, 0, 7, 1], [0, 0, 3, 9]]
    assert_png(plots.plot_confusion(confusion, CLASSES, tmp_path / "confusion.png"), tmp_path)
    with pytest.raises(ValueError):
        plots.plot_confusion([[1, 2, 3]], CLASSES, tmp_path / "bad.png")
