"""``dfkd amalgamate`` and short digits amalgamation runs: two teachers trained on disjoint
halves of the classes become one 10-class student."""
import json

import pytest
import torch

from dfkd.cli import build_parser, main

DI_RECIPE = {"iterations": 40, "synthesis_batch_size": 64, "student_steps_per_round": 40, "batch_size": 32, "lr": 0.1}


@pytest.fixture(scope="module")
def digits_zoo(tmp_path_factory):
    """lenet5_bn teachers on digits 0-4 and 5-9 (8 epochs each) and their manifest."""
    from dfkd.api.teacher import dataset_meta
    from dfkd.data import load_dataset
    from teachers import build_manifest, build_model, save_checkpoint, train_classifier

    root = tmp_path_factory.mktemp("zoo")
    for name, classes in (("digits_low", [0, 1, 2, 3, 4]), ("digits_high", [5, 6, 7, 8, 9])):
        torch.manual_seed(0)
        train = load_dataset("digits", "train", classes=classes)
        test = load_dataset("digits", "test", classes=classes)
        model = build_model("lenet5_bn", 5, 1, 32, train.info.mean, train.info.std)
        result = train_classifier(model, train.images, train.labels, test.images, test.labels, epochs=8,
                                  batch_size=64, progress=False)
        assert result["test_accuracy"] > 0.9
        meta = dataset_meta(train.info)
        meta.update(test_accuracy=result["test_accuracy"], seed=0)
        save_checkpoint(root / f"{name}.pt", model, meta)
    build_manifest(root, root / "zoo.yaml")
    return root / "zoo.yaml"


def test_real_synthesizer_samples_the_given_images(bn_teacher, student):
    import generators.real  # noqa: F401  (registration)
    from generators import SynthesizerOptionError, create_synthesizer

    images = torch.rand(6, 1, 32, 32)

    def make(**kw):
        return create_synthesizer("real", bn_teacher, image_shape=(1, 32, 32), num_classes=10, seed=0, **kw)

    synth = make(images=images, batch_size=20, augment=False)
    assert synth.synthesize(student) == {}
    batch = synth.sample().images
    assert batch.shape == (20, 1, 32, 32)
    assert all(any(torch.equal(row, img) for img in images) for row in batch)  # drawn from the set, unaugmented
    augmented = make(images=images, batch_size=20).sample().images
    assert not all(any(torch.equal(row, img) for img in images) for row in augmented)
    assert synth.images_synthesized == 0
    with pytest.raises(SynthesizerOptionError, match="needs the real images"):
        make()
    with pytest.raises(SynthesizerOptionError, match="N x 1 x 32 x 32"):
        make(images=torch.rand(4, 3, 32, 32))
    with pytest.raises(SynthesizerOptionError, match=r"\[0, 1\]"):
        make(images=images * 2)


def test_parser_and_config(tmp_path):
    from dfkd.cli.amalgamate import amalgamate_config, run

    args = build_parser().parse_args(["amalgamate", "--zoo", "z.yaml", "--method", "real", "--combine", "entropy_weighted",
                                      "--combine-opt", "tau=0.5", "--combine-opt", "normalize=true", "--features", "hint",
                                      "--layers", "relu3:a.relu3", "--steps", "7", "--out", str(tmp_path), "steps=9"])
    assert args.func is run
    cfg = amalgamate_config(args).to_dict()
    assert cfg["combine_options"] == {"tau": 0.5, "normalize": True}
    assert (cfg["method"], cfg["features"], cfg["layers"], cfg["steps"]) == ("real", "hint", "relu3:a.relu3", 9)
    assert cfg["student"] == "lenet5_half"  # distill's defaults apply


def test_errors_are_reported_before_any_work(digits_zoo, tmp_path, capsys):
    assert main(["amalgamate", "--zoo", str(digits_zoo), "--combine", "median", "--out", str(tmp_path / "r"),
                 "--quiet", "--no-eval"]) == 2
    assert "known combiners" in capsys.readouterr().err
    assert main(["amalgamate", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "--zoo" in capsys.readouterr().err
    assert main(["amalgamate", "--zoo", str(digits_zoo), "--method", "magic", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "known methods" in capsys.readouterr().err
    assert main(["amalgamate", "--zoo", str(digits_zoo), "--steps", "0", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "steps must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a run refused before its first step leaves no folder


def test_amalgamate_resume_completes_and_ctrl_c_names_amalgamate(digits_zoo, tmp_path, capsys, monkeypatch):
    import dfkd.cli.amalgamate as command
    from dfkd.engine.run import RunInterrupted
    from dfkd.engine.rundir import run_status

    out = tmp_path / "r"
    argv = ["amalgamate", "--zoo", str(digits_zoo), "--method", "real", "--combine", "concat", "--steps", "4",
            "--batch-size", "16", "--no-eval", "--device", "cpu", "--out", str(out), "--quiet", "samples=16"]
    assert main(argv) == 0
    student = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    (out / "report.md").unlink()  # killed between training and the report
    (out / "summary.json").unlink()
    assert main(argv) == 2 and f"--resume {out}" in capsys.readouterr().err  # a new run is refused
    assert main(["amalgamate", "--resume", str(out), "--quiet"]) == 0
    assert run_status(out) == "finished" and json.loads((out / "summary.json").read_text())["zoo"] == str(digits_zoo)
    again = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(student[k], again[k]) for k in student)

    def interrupted(*args, **kwargs):
        raise RunInterrupted(out, 2)

    monkeypatch.setattr(command, "amalgamate", interrupted)
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 130
    assert capsys.readouterr().err == f"interrupted; resume with dfkd amalgamate --resume {out}\n"


@pytest.mark.slow
def test_amalgamate_real_images_gives_a_ten_class_student(digits_zoo, tmp_path):
    out = tmp_path / "real"
    code = main(["amalgamate", "--zoo", str(digits_zoo), "--student", "lenet5_half", "--method", "real",
                 "--combine", "concat", "--steps", "150", "--batch-size", "64", "--device", "cpu", "--seed", "0",
                 "--out", str(out), "--quiet", "samples=64"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "real" and summary["combine"] == "concat"
    assert summary["ensemble_accuracy"] > 0.85  # concatenated logits of the two halves
    assert summary["student_accuracy"] > 0.6  # chance is 0.1; about 0.89 measured
    assert len(summary["per_class_accuracy"]) == 10 and summary["class_names"] == [str(i) for i in range(10)]
    teachers = {row["name"]: row for row in summary["teachers"]}
    assert set(teachers) == {"digits_low", "digits_high"}
    assert teachers["digits_high"]["union_index"] == [5, 6, 7, 8, 9]
    assert all(row["accuracy"] > 0.9 and row["student_accuracy_on_classes"] > 0.5 for row in teachers.values())
    for name in ("config.yaml", "metrics.csv", "student.pt", "synthesizer.pt", "state.pt"):
        assert (out / name).exists(), name
    from teachers import load_checkpoint

    _, meta = load_checkpoint(out / "student.pt")
    assert meta["classes"] == list(range(10)) and meta["dataset"] == "digits"


@pytest.mark.slow
def test_data_free_amalgamation_with_deepinversion_beats_chance(digits_zoo, tmp_path):
    """DeepInversion driven by the ensemble (BN statistics of both teachers), UHC student loss."""
    from dfkd.data import load_dataset
    from dfkd.engine.evaluation import EvalData
    from dfkd.engine.run import DistillationRun, RunOptions
    from dfkd.multi.ensemble import TeacherEnsemble
    from dfkd.multi.synthesizer import AmalgamationSynthesizer
    from generators import create_synthesizer
    from teachers import build_model, freeze
    from teachers.device import seed_everything

    seed_everything(0)
    ensemble = freeze(TeacherEnsemble.from_zoo(digits_zoo, combine="uhc"))
    meta = ensemble.meta()
    student = build_model("lenet5_half", 10, 1, 32, meta["mean"], meta["std"])
    inner = create_synthesizer("deepinversion", ensemble, image_shape=meta["image_shape"], num_classes=10, seed=0,
                               **DI_RECIPE)
    synth = AmalgamationSynthesizer(inner, ensemble, combine="uhc")
    test = load_dataset("digits", "test")
    student_meta = {k: meta[k] for k in ("dataset", "classes", "class_names", "mean", "std", "image_shape")}
    student_meta["seed"] = 0
    run = DistillationRun(ensemble, student, synth, tmp_path / "di", RunOptions(steps=120, log_every=40, progress=False),
                          eval_data=EvalData(test.images, test.labels), student_meta=student_meta)
    summary = run.run()
    assert summary["images_synthesized"] == 3 * 64
    assert summary["student_accuracy"] > 0.3  # chance is 0.1; about 0.6 measured
    assert "uhc" in run.metrics[-1]


def test_amalgamate_accepts_bn_priors(digits_zoo, tmp_path):
    """--bn-prior works for zoos too: here a member's own checkpoint is a prior of the whole batch."""
    out = tmp_path / "prior"
    code = main(["amalgamate", "--zoo", str(digits_zoo), "--method", "fast", "--combine", "concat", "--steps", "4",
                 "--device", "cpu", "--out", str(out), "--quiet", "--bn-prior", str(digits_zoo.parent / "digits_low.pt"),
                 "samples=32", "options.ngf=8", "options.synthesis_batch_size=16", "options.warmup_rounds=1",
                 "options.student_steps_per_round=2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [prior["classes"] for prior in summary["bn_priors"]] == [5]
    assert "inv_bn_prior" in (out / "metrics.csv").read_text().splitlines()[0]
