"""analyze_run on a tiny random teacher, and write_report on full and bare run directories."""
import json

import pytest
import torch
from torch import nn

from dfkd.reporting.analysis import analyze_run, confusion_matrix
from dfkd.reporting.quality import class_balance, sure_teacher_agreement
from dfkd.reporting.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["zero", "one", "two", "three"]


class TinyCNN(nn.Module):
    """A 4-class CNN on 1x8x8 images whose classifier head is ``fc``."""

    head_path = "fc"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.pool(self.conv(x))).flatten(1))


def _write_metrics(run_dir):
    (run_dir / "metrics.csv").write_text(
        "step,seconds,kd,lr,images_synthesized,student_accuracy,agreement\n10,1.0,1.2,0.1,64,0.3,0.4\n20,2.0,0.9,0.1,128,0.5,0.6\n",
        encoding="utf-8",
    )


def test_analyze_run_writes_plots_and_returns_metrics(tmp_path):
    torch.manual_seed(0)
    teacher, student = TinyCNN(), TinyCNN()
    student.train()
    gen = torch.Generator().manual_seed(0)
    synthetic, real = torch.rand(40, 1, 8, 8, generator=gen), torch.rand(24, 1, 8, 8, generator=gen)
    real_labels = torch.arange(24) % 4
    _write_metrics(tmp_path)

    result = analyze_run(tmp_path, teacher, student, synthetic, real, real_labels, class_names=NAMES)

    assert set(result) == {"class_balance", "mean_confidence", "diversity", "frechet_distance", "sure_teacher", "plots"}
    assert sorted(result["plots"]) == sorted(["samples.png", "classes.png", "embedding.png", "confusion.png", "curves.png"])
    for name in result["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    with torch.no_grad():
        expected_balance = class_balance(teacher(synthetic).argmax(1), 4)
    assert result["class_balance"] == pytest.approx(expected_balance)
    assert result["frechet_distance"] is not None and result["diversity"] > 0
    with torch.no_grad():  # the sure-teacher split covers every real image, not the 2000-image subset
        expected_sure = sure_teacher_agreement(teacher(real), student.eval()(real).argmax(1))
    student.train()
    assert result["sure_teacher"] == expected_sure
    assert student.training and not teacher.training
    assert not teacher.fc._forward_pre_hooks, "the penultimate tap was not removed"


def test_analyze_run_without_real_images(tmp_path):
    teacher = TinyCNN()
    result = analyze_run(tmp_path, teacher, TinyCNN().eval(), torch.rand(10, 1, 8, 8))
    assert result["plots"] == ["samples.png", "classes.png"]
    assert result["frechet_distance"] is None
    assert "sure_teacher" not in result


def test_confusion_matrix_counts():
    predictions, labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    assert confusion_matrix(predictions, labels, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_write_report_full_run_dir(tmp_path):
    summary = {
        "method": "dafl",
        "command": ["dfkd", "distill", "--method", "dafl"],
        "teacher_accuracy": 0.9512,
        "student_accuracy": 0.8734,
        "agreement": 0.9,
        "steps": 200,
        "wall_seconds": 40.0,
        "images_synthesized": 6400,
        "options": {"lr": 0.1},
        "per_class_accuracy": [0.5, None, 1.0, 0.25],
        "class_names": NAMES,
        "sample_quality": {"class_balance": 0.75, "mean_confidence": 0.6, "diversity": 3.25, "frechet_distance": None},
        "sure_teacher": {"threshold": 0.9, "sure_fraction": 0.75, "sure_agreement": 0.92, "unsure_agreement": None,
                         "misses": [{"teacher": 3, "student": 1, "count": 7, "of": 40}]},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (tmp_path / "config.yaml").write_text("method: dafl\nsteps: 200\n", encoding="utf-8")
    _write_metrics(tmp_path)
    (tmp_path / "samples.png").write_bytes(PNG_SIGNATURE)
    (tmp_path / "curves.png").write_bytes(PNG_SIGNATURE)

    text = write_report(tmp_path).read_text(encoding="utf-8")

    assert text.startswith("# dfkd run: dafl")
    assert "dfkd distill --method dafl" in text and "steps: 200" in text
    for number in ("95.12%", "87.34%", "90.00%", "200", "6400", "160.0", "0.7500", "3.2500"):
        assert number in text, number
    assert "| three | 25.00% |" in text and "| one | – (no test examples) |" in text
    assert "(confidence >= 0.90) | 75.00% |" in text and "| Student-teacher agreement on those | 92.00% |" in text
    assert "agreement on the others" not in text  # no unsure images: the row is left out
    assert "| three -> one | 7 of 40 |" in text
    assert "![samples](samples.png)" in text and "![curves](curves.png)" in text
    assert "embedding.png" not in text and "confusion.png" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_report_with_only_a_sparse_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"method": "zskt", "student_accuracy": 0.5}), encoding="utf-8")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "# dfkd run: zskt" in text and "50.00%" in text
    assert "![" not in text and "What was run" not in text


def test_write_report_without_summary(tmp_path):
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No `summary.json`" in text
