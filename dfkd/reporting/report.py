"""A Markdown report of one run directory: what was run, the numbers, the figures.

:func:`write_report` reads whatever the run directory holds (``summary.json``,
``config.yaml``, the PNGs of :mod:`dfkd.reporting.analysis`) and writes ``report.md`` next to them.
Anything missing is left out of the report, never an error.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from teachers.files import write_text

#: The figures a run directory may hold, in report order, with what each one shows.
PLOTS = (
    ("samples", "Synthesized images grouped by the teacher's predicted class (most confident first, captioned with the teacher's confidence), beside real test images of each class when available."),
    ("classes", "How often the teacher predicts each class on the synthesized images; the dashed line is the uniform expectation."),
    ("embedding", "The teacher's penultimate features of real (dots) and synthesized (crosses) images in two dimensions, coloured by class."),
    ("confusion", "The student's confusion matrix on real test data, row-normalised colours with raw counts."),
    ("curves", "Loss terms and the student's test accuracy and teacher agreement over training steps."),
)

QUALITY_LABELS = (
    ("class_balance", "Class balance (normalised entropy, 1 = uniform)"),
    ("mean_confidence", "Teacher mean confidence"),
    ("diversity", "Diversity (mean pairwise feature distance)"),
    ("frechet_distance", "Fréchet distance to real data (teacher features)"),
)


def _number(value):
    """A finite float (or int) from ``value``, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _percent(value) -> str | None:
    value = _number(value)
    return None if value is None else f"{100 * value:.2f}%"


def _plain(value, digits: int = 4) -> str | None:
    value = _number(value)
    if value is None:
        return None
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def _read_summary(run_dir: Path) -> tuple[dict, str | None]:
    """``summary.json`` as a dict, and a note when it is missing or unreadable."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}, "No `summary.json` in this run directory."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return {}, f"`summary.json` could not be read ({error})."
    return (data, None) if isinstance(data, dict) else ({}, "`summary.json` is not a JSON object.")


def _table(rows: list[tuple[str, str]], header=("Quantity", "Value")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines


def _what_was_run(run_dir: Path, summary: dict) -> list[str]:
    lines = []
    command = summary.get("command")
    if command:
        command = shlex.join(map(str, command)) if isinstance(command, (list, tuple)) else str(command)
        lines += ["Command:", "", "```bash", command, "```", ""]
    priors = summary.get("bn_priors")
    if isinstance(priors, list) and priors:
        lines += ["BN-statistics priors (their BatchNorm statistics joined the teacher's in the inversion):", ""]
        for prior in priors:
            if isinstance(prior, dict):
                accuracy = _percent(prior.get("test_accuracy"))
                lines.append(f"- `{prior.get('path')}`: {prior.get('arch')}, {prior.get('classes')} classes of "
                             f"{prior.get('dataset')}" + (f", test accuracy {accuracy}" if accuracy else ""))
        lines.append("")
    config = run_dir / "config.yaml"
    if config.exists():
        try:
            lines += ["Configuration (`config.yaml`):", "", "```yaml", config.read_text(encoding="utf-8").rstrip(), "```", ""]
        except OSError:
            pass
    options = summary.get("options")
    if isinstance(options, dict) and options:
        lines += ["Method options:", "", "```json", json.dumps(options, indent=2, default=str), "```", ""]
    return ["## What was run", ""] + lines if lines else []


def _numbers(summary: dict) -> list[str]:
    rows = [
        ("Teacher accuracy", _percent(summary.get("teacher_accuracy"))),
        ("Student accuracy", _percent(summary.get("student_accuracy"))),
        ("Student-teacher agreement", _percent(summary.get("agreement"))),
        ("Steps", _plain(summary.get("steps"))),
        ("Wall seconds", _plain(summary.get("wall_seconds"), 1)),
        ("Images synthesized", _plain(summary.get("images_synthesized"))),
    ]
    images, seconds = _number(summary.get("images_synthesized")), _number(summary.get("wall_seconds"))
    if images is not None and seconds:
        rows.append(("Images synthesized per second", f"{images / seconds:.1f}"))
    quality = summary.get("sample_quality")
    if isinstance(quality, dict):
        rows += [(label, _plain(quality.get(key))) for key, label in QUALITY_LABELS]
    rows = [(name, value) for name, value in rows if value is not None]
    return ["## Numbers", ""] + _table(rows) + [""] if rows else []


def _per_class(summary: dict) -> list[str]:
    accuracies = summary.get("per_class_accuracy")
    if not isinstance(accuracies, (list, tuple)) or not accuracies:
        return []
    names = _class_names(summary, len(accuracies))
    rows = [(names[k], _percent(value) or "– (no test examples)") for k, value in enumerate(accuracies)]
    return ["## Per-class student accuracy", ""] + _table(rows, header=("Class", "Accuracy")) + [""]


def _class_names(summary: dict, count: int) -> list[str]:
    names = summary.get("class_names")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) else []
    return names + [str(k) for k in range(len(names), count)]


def _sure_teacher(summary: dict) -> list[str]:
    """The student against a teacher that is sure (``summary["sure_teacher"]``, see
    :func:`dfkd.reporting.quality.sure_teacher_agreement`)."""
    sure = summary.get("sure_teacher")
    if not isinstance(sure, dict) or sure.get("sure_fraction") is None:
        return []
    threshold = _number(sure.get("threshold"))
    threshold_text = f"{threshold:.2f}" if threshold is not None else "the threshold"
    rows = [
        (f"Real test images the teacher is sure of (confidence >= {threshold_text})", _percent(sure.get("sure_fraction"))),
        ("Student-teacher agreement on those", _percent(sure.get("sure_agreement"))),
        ("Student-teacher agreement on the others", _percent(sure.get("unsure_agreement"))),
    ]
    lines = ["## Where the student parts from a sure teacher", ""]
    lines += _table([(name, value) for name, value in rows if value is not None])
    misses = [m for m in sure.get("misses") or [] if isinstance(m, dict)]
    if misses:
        count = max(max(int(m.get("teacher", 0)), int(m.get("student", 0))) for m in misses) + 1
        names = _class_names(summary, count)
        lines += ["", "Most frequent misses among the images the teacher is sure of (a data-free student that misses "
                      "these has not seen those modes of the data):", ""]
        lines += _table([(f"{names[int(m['teacher'])]} -> {names[int(m['student'])]}", f"{int(m['count'])} of {int(m['of'])}")
                         for m in misses], header=("Teacher -> student", "Images"))
    return lines + [""]


def _figures(run_dir: Path) -> list[str]:
    lines = []
    for name, sentence in PLOTS:
        if (run_dir / f"{name}.png").exists():
            lines += [f"![{name}]({name}.png)", "", sentence, ""]
    return ["## Figures", ""] + lines if lines else []


def write_report(run_dir) -> Path:
    """Write ``run_dir/report.md`` (atomically) and return its path.

    Sections, each skipped when its inputs are missing: a title with the method; "What was
    run" (``summary["command"]``, ``config.yaml``, the method's options); a table of the
    numbers (accuracies, agreement, steps, wall time, images synthesized and per second, the
    ``summary["sample_quality"]`` metrics); per-class accuracy (names from
    ``summary["class_names"]``); the student's agreement with a sure teacher and its most
    frequent misses there (``summary["sure_teacher"]``); and the figures present (``samples.png``, ``classes.png``,
    ``embedding.png``, ``confusion.png``, ``curves.png``), each with a sentence on what it
    shows.
    """
    run_dir = Path(run_dir)
    summary, note = _read_summary(run_dir)
    method = summary.get("method")
    lines = [f"# dfkd run: {method}" if method else f"# dfkd run: {run_dir.name}", ""]
    lines += [f"Run directory: `{run_dir.name}`", ""]
    if note:
        lines += [f"_{note}_", ""]
    for section in (_what_was_run(run_dir, summary), _numbers(summary), _per_class(summary), _sure_teacher(summary), _figures(run_dir)):
        lines += section
    return write_text(run_dir / "report.md", "\n".join(lines).rstrip() + "\n")
