"""benchmarks/run_benchmarks.py: teacher fingerprints in run records and the report section
that names the teacher files behind each row's seeds."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_benchmarks", ROOT / "benchmarks" / "run_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "ZOO_DIR", tmp_path / "zoo")
    return module


def _checkpoint(path: Path, accuracy: float, value: float) -> Path:
    torch.save({"state_dict": {"w": torch.full((2,), value)}, "meta": {"test_accuracy": accuracy}}, path)
    return path


def test_fingerprints_name_single_teacher_and_zoo_members(bench, tmp_path):
    teacher = _checkpoint(tmp_path / "t.pt", 0.9, 1.0)
    (tmp_path / "zoo" / "a").mkdir(parents=True)
    _checkpoint(tmp_path / "zoo" / "a" / "m1.pt", 0.8, 2.0)
    _checkpoint(tmp_path / "zoo" / "a" / "m2.pt", 0.7, 3.0)
    (tmp_path / "zoo" / "zoo_a.yaml").write_text("members: []\n")

    single = bench.teacher_fingerprints(f"distill --teacher {teacher} --seed 0")
    assert list(single) == ["t.pt"] and single["t.pt"]["test_accuracy"] == 0.9
    assert len(single["t.pt"]["sha256"]) == 12

    zoo = bench.teacher_fingerprints(f"amalgamate --zoo {tmp_path / 'zoo' / 'zoo_a.yaml'} --seed 0")
    assert sorted(zoo) == ["m1.pt", "m2.pt"]
    assert zoo["m1.pt"]["sha256"] != zoo["m2.pt"]["sha256"]


def test_report_section_groups_seeds_by_teacher_file(bench):
    folder = bench.RESULTS / "best"
    folder.mkdir(parents=True)
    new = {"t.pt": {"sha256": "abcdef012345", "test_accuracy": 0.9082}}
    records = {0: {"seed": 0, "command": "dfkd distill"},  # before fingerprints existed
               1: {"seed": 1, "command": "dfkd distill", "teachers": new},
               2: {"seed": 2, "command": "dfkd distill", "teachers": new}}
    for seed, record in records.items():
        (folder / f"seed{seed}.json").write_text(json.dumps(record))
    section = bench.teachers_used()
    line = next(line for line in section.splitlines() if line.startswith("- best:"))
    assert "seeds 0: the first checkpoints" in line
    assert "seeds 1,2: t.pt abcdef012345 (90.82%)" in line


def test_report_names_the_runs_machines_not_only_its_own(bench):
    records = [{"machine": "CPU A, 2 cores"}, {"machine": "CPU A, 2 cores"}, {"machine": "CPU B, 2 cores"}, {}]
    line = bench.machines_used(records)
    assert "CPU A, 2 cores (2 runs)" in line and "CPU B, 2 cores (1 run)" in line
    assert line.count("1 run recorded before runs named their machine") == 1
    assert bench.machines_used([]) == "no runs yet"
