"""The Python API: the README's example runs as written, configs layer and check like the
command line's, and a zoo run directory can be re-plotted."""
import re
from pathlib import Path

import pytest

import dfkd
from dfkd.api import AmalgamateConfig, DistillConfig, RunError
from dfkd.config import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    run, teacher = namespace["run"], namespace["teacher"]
    assert teacher.test_accuracy > 0.8  # digits, 3 epochs
    assert (tmp_path / "runs/api/dafl/report.md").exists()
    assert run.summary["method"] == "dafl" and run.summary["steps"] == 100
    assert 0.0 <= run.student_accuracy <= 1.0
    assert namespace["meta"]["classes"] == list(range(10))
    assert "student" in capsys.readouterr().out


def test_configs_take_keywords_and_check_them_like_the_command_line():
    config = DistillConfig.from_layers({"method": "fast", "steps": 10}, {"steps": 0, "seed": 0})
    assert (config.method, config.steps, config.seed) == ("fast", 0, 0)  # explicit zeros are values
    assert config.replace(student_lr=0.05).student_lr == 0.05
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        DistillConfig.from_layers({"nope": 1})
    with pytest.raises(ConfigError, match="steps must be an integer"):
        DistillConfig.from_layers({"steps": 1.5})
    assert "teacher" not in AmalgamateConfig.defaults() and "zoo" in AmalgamateConfig.defaults()


def test_distill_names_what_is_missing(tmp_path):
    with pytest.raises(RunError, match="--teacher"):
        dfkd.distill(out=str(tmp_path / "r"))
    with pytest.raises(RunError, match="no such file"):
        dfkd.distill(teacher=str(tmp_path / "missing.pt"), out=str(tmp_path / "r"))


@pytest.fixture(scope="module")
def half_zoo(tmp_path_factory):
    """Two digits teachers on disjoint halves (1 epoch each) and their manifest."""
    from teachers import build_manifest

    root = tmp_path_factory.mktemp("halves")
    for name, classes in (("low", "0-4"), ("high", "5-9")):
        dfkd.train_teacher(dataset="digits", arch="lenet5", classes=classes, epochs=1, out=str(root / f"{name}.pt"),
                           progress=False)
    build_manifest(root, root / "zoo.yaml")
    return root / "zoo.yaml"


def test_a_zoo_run_keeps_its_zoo_and_plots_again(half_zoo, tmp_path, capsys):
    from dfkd.cli import main
    from dfkd.config import load_yaml

    run = dfkd.amalgamate(zoo=str(half_zoo), method="real", combine="concat", steps=4, batch_size=16, samples=32,
                          out=str(tmp_path / "amal"), progress=False)
    config = load_yaml(run.run_dir / "config.yaml")
    assert config["zoo"] == str(half_zoo) and "teacher" not in config
    assert run.summary["zoo"] == str(half_zoo) and len(run.summary["teachers"]) == 2
    (run.run_dir / "samples.png").unlink()
    assert main(["plot", "samples", str(run.run_dir)]) == 0
    assert (run.run_dir / "samples.png").exists()
    assert "samples.png" in capsys.readouterr().out


def test_train_teacher_takes_the_official_dafl_way(tmp_path, monkeypatch):
    """schedule=constant and augment=none reach train_classifier (DAFL's teacher-train.py:
    Adam at a constant learning rate, no augmentation) and are recorded in the checkpoint."""
    import teachers.training as training

    seen = {}
    original = training.train_classifier

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr("dfkd.api.teacher.train_classifier", spy)
    result = dfkd.train_teacher(dataset="digits", arch="lenet5", epochs=1, optimizer="adam", lr=1e-3,
                                schedule="constant", augment="none", out=str(tmp_path / "t.pt"), progress=False)
    assert (seen["schedule"], seen["augment"]) == ("constant", "none")
    from teachers import load_checkpoint

    _, meta = load_checkpoint(result.path)
    assert meta["config"]["schedule"] == "constant"
