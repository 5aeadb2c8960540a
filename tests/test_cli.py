"""The dfkd command end to end through subprocess on the digits set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dfkd(*args, check=True, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "dfkd", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"dfkd {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "digits_lenet5_bn.pt"
    out = dfkd("train-teacher", "--dataset", "digits", "--arch", "lenet5_bn", "--epochs", 4, "--quiet", "--out", path)
    assert "test accuracy" in out.stdout
    return path


def test_help_lists_subcommands_and_defaults():
    out = dfkd("--help").stdout
    for name in ("train-teacher", "distill", "evaluate", "plot", "zoo", "demo"):
        assert name in out
    assert "default 1000" in dfkd("distill", "--help").stdout



def test_help_names_no_default_where_the_config_decides():
    from dfkd.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in ("train-teacher", "distill", "amalgamate", "born-again"):
        text = subcommands[command].format_help()
        assert "--epochs" in text or "--steps" in text or "--generations" in text
        assert "(default: None)" not in text and "(default: [])" not in text


def test_teacher_is_clearly_better_than_chance_and_evaluates(teacher, tmp_path):
    out = dfkd("evaluate", "--model", teacher, "--json", tmp_path / "e.json").stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["accuracy"] > 0.8
    assert "accuracy" in out and "0:" in out or "0" in out


@pytest.mark.slow
def test_distill_writes_run_directory_and_refuses_to_overwrite(teacher, tmp_path):
    run = tmp_path / "run"
    dfkd("distill", "--teacher", teacher, "--method", "dafl", "--steps", 6, "--quiet", "--out", run,
         "batch_size=32", "options.ngf=8", "samples=64")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dafl" and summary["steps"] == 6
    for name in ("config.yaml", "metrics.csv", "student.pt", "synthesizer.pt", "samples.png", "report.md"):
        assert (run / name).exists(), name
    again = dfkd("distill", "--teacher", teacher, "--steps", 6, "--out", run, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # replaying the resolved config reproduces the run
    dfkd("distill", "--config", run / "config.yaml", "--quiet", f"out={tmp_path / 'replay'}")
    replay = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert replay["student_accuracy"] == summary["student_accuracy"]
    assert replay["agreement"] == summary["agreement"]


def test_config_errors_name_the_problem(teacher, tmp_path, capsys):
    bad = dfkd("distill", "--teacher", teacher, "--out", tmp_path / "x", "stepz=3", check=False)  # the real exit
    assert bad.returncode == 2 and "unknown config key 'stepz'" in bad.stderr and "steps" in bad.stderr
    from dfkd.cli import main

    def refused(*args) -> str:  # the same command line in this process (no interpreter start per case)
        assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "x"), *args]) == 2
        return capsys.readouterr().err

    assert "steps must be an integer" in refused("steps=many")
    err = refused("options.lrr=1")
    assert "lrr" in err and "accepted" in err
    err = refused("--method", "magic")
    assert "dafl" in err and "deepinversion" in err
    assert "lenet5_half" in refused("--student", "lenet99")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_zoo_build_verify_list(teacher, tmp_path):
    manifest = tmp_path / "zoo.yaml"
    dfkd("zoo", "build", teacher.parent, "--out", manifest)
    assert "verified" in dfkd("zoo", "verify", manifest).stdout
    table = dfkd("zoo", "list", manifest).stdout
    assert "lenet5_bn" in table and "digits" in table


@pytest.mark.slow
def test_plot_redraws_from_run_directory(teacher, tmp_path):
    run = tmp_path / "run"
    dfkd("distill", "--teacher", teacher, "--method", "dfad", "--steps", 5, "--quiet", "--out", run,
         "batch_size=32", "options.ngf=8", "samples=64")
    (run / "curves.png").unlink(missing_ok=True)
    dfkd("plot", "curves", run)
    assert (run / "curves.png").stat().st_size > 1000
    (run / "samples.png").unlink()
    dfkd("plot", "samples", run)
    assert (run / "samples.png").exists()


@pytest.mark.slow
def test_resume_continues_a_killed_run(teacher, tmp_path):
    run = tmp_path / "run"
    dfkd("distill", "--teacher", teacher, "--method", "dafl", "--steps", 8, "--quiet", "--out", run,
         "--checkpoint-every", 4, "batch_size=32", "options.ngf=8", "samples=32")
    (run / "report.md").unlink()  # pretend it died after training, before the report
    (run / "summary.json").unlink()
    out = dfkd("distill", "--resume", run, "--quiet")
    assert "student" in out.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 8 and (run / "report.md").exists()


@pytest.mark.slow
def test_import_weights_from_a_plain_state_dict(teacher, tmp_path):
    import torch

    from teachers import load_checkpoint

    model, _ = load_checkpoint(teacher)
    plain = tmp_path / "their_weights.pth"
    torch.save({f"module.{k}": v for k, v in model.net.state_dict().items()}, plain)
    out = tmp_path / "imported.pt"
    dfkd("import-weights", plain, "--arch", "lenet5_bn", "--dataset", "digits", "--out", out)
    imported, meta = load_checkpoint(out)
    assert meta["dataset"] == "digits" and meta["classes"] == list(range(10))
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(imported(x), model(x), atol=1e-5)
    wrong = dfkd("import-weights", plain, "--arch", "lenet5", "--dataset", "digits", "--out", tmp_path / "w.pt", check=False)
    assert wrong.returncode == 2 and "bn1" in wrong.stderr


@pytest.mark.slow
def test_overrides_may_come_between_options(teacher, tmp_path):
    bad = dfkd("distill", "--teacher", teacher, "steps=3", "--out", tmp_path / "x", "stepz=1", check=False)
    assert bad.returncode == 2 and "unknown config key 'stepz'" in bad.stderr
    bad = dfkd("distill", "--teacher", teacher, "--out", tmp_path / "x", "--no-such-flag", check=False)
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
