"""BN-statistics priors (generators.priors, --bn-prior): other models' BatchNorm statistics
join the inversion of DeepInversion and Fast."""
import json

import pytest
import torch

from generators import SynthesizerOptionError, create_synthesizer
from generators.priors import BNPriorError, BNPriors

SHAPE = (1, 32, 32)


def make(name, teacher, **kw):
    return create_synthesizer(name, teacher, image_shape=SHAPE, num_classes=10, device="cpu", seed=0, **kw)


@pytest.fixture
def prior():
    """A frozen resnet8 whose BN running statistics are those of dim images (x 0.3), far from
    the teacher's (uniform images)."""
    from teachers import build_model, freeze

    torch.manual_seed(3)
    model = build_model("resnet8", 5, 1, 32, (0.3,), (0.35,))
    model.train()
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # running statistics = the average over the batches below
    with torch.no_grad():
        for _ in range(3):
            model(0.3 * torch.rand(64, 1, 32, 32))
    return freeze(model)


def prior_bn_loss(prior, images):
    priors = BNPriors([prior], "test")
    try:
        with torch.no_grad():
            return priors.loss(images).item()
    finally:
        priors.close()


def test_deepinversion_with_a_prior_matches_the_priors_statistics_better(bn_teacher, prior):
    kw = dict(iterations=40, synthesis_batch_size=32, bn_weight=1.0, lr=0.1)
    plain = make("deepinversion", bn_teacher, **kw)
    with_prior = make("deepinversion", bn_teacher, bn_priors=[prior], **kw)
    plain_images, plain_terms = plain.invert(None)
    prior_images, prior_terms = with_prior.invert(None)
    assert "bn_prior" in prior_terms and "bn_prior" not in plain_terms
    assert prior_bn_loss(prior, prior_images) < 0.1 * prior_bn_loss(prior, plain_images)


def test_fast_logs_the_prior_term_keeps_the_prior_frozen_and_checkpoints_its_averages(bn_teacher, student, prior):
    running = [b.clone() for b in prior.buffers()]
    synth = make("fast", bn_teacher, bn_priors=[prior], ngf=8, nz=16, synthesis_batch_size=16, batch_size=8,
                 warmup_rounds=1)
    terms = synth.synthesize(student)
    assert set(terms) == {"inv_oh", "inv_bn", "inv_bn_prior", "inv_adv"}
    assert terms["inv_bn_prior"] > 0
    assert all(torch.equal(a, b) for a, b in zip(running, prior.buffers()))  # running statistics untouched
    assert all(p.grad is None for p in prior.parameters())
    # Fast's BN momentum covers the priors too, and survives a checkpoint
    averages = synth.bn_priors.state_dict()
    assert averages and all(entry is not None for entry in averages[0])
    again = make("fast", bn_teacher, bn_priors=[prior], ngf=8, nz=16, synthesis_batch_size=16, batch_size=8,
                 warmup_rounds=1)
    again.load_state_dict(synth.state_dict())
    for (m1, v1, _), (m2, v2, _) in zip(averages[0], again.bn_priors.state_dict()[0]):
        assert torch.equal(m1, m2) and torch.equal(v1, v2)
    without = make("fast", bn_teacher, ngf=8, nz=16, synthesis_batch_size=16, warmup_rounds=1)
    with pytest.raises(BNPriorError, match="resume with the same bn_priors"):
        without.load_state_dict(synth.state_dict())


def test_priors_are_refused_where_they_cannot_act(bn_teacher, prior):
    from teachers import build_model, freeze

    with pytest.raises(SynthesizerOptionError, match="does not match BatchNorm statistics.*deepinversion, fast"):
        make("dafl", bn_teacher, bn_priors=[prior])
    with pytest.raises(SynthesizerOptionError, match="bn_weight is 0"):
        make("fast", bn_teacher, bn_priors=[prior], bn_weight=0.0)
    plain = freeze(build_model("lenet5", 10, 1, 32, (0.3,), (0.35,)))
    with pytest.raises(BNPriorError, match="no BatchNorm layers"):
        make("deepinversion", bn_teacher, bn_priors=[plain])


@pytest.mark.slow
def test_cli_bn_prior_end_to_end(tmp_path):
    from test_cli import dfkd

    teacher, prior_path = tmp_path / "t.pt", tmp_path / "r.pt"
    dfkd("train-teacher", "--dataset", "digits", "--arch", "lenet5_bn", "--epochs", 1, "--quiet", "--out", teacher)
    dfkd("train-teacher", "--dataset", "digits", "--arch", "resnet8", "--epochs", 1, "--quiet", "--out", prior_path)
    run = tmp_path / "run"
    dfkd("distill", "--teacher", teacher, "--method", "fast", "--steps", 6, "--quiet", "--out", run, "--bn-prior", prior_path,
         "--checkpoint-every", 3, "samples=32", "options.ngf=8", "options.synthesis_batch_size=16",
         "options.warmup_rounds=1", "options.student_steps_per_round=3")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bn_priors"][0]["arch"] == "resnet8" and summary["bn_priors"][0]["path"] == str(prior_path)
    assert "inv_bn_prior" in (run / "metrics.csv").read_text().splitlines()[0]
    assert "BN-statistics priors" in (run / "report.md").read_text()
    (run / "report.md").unlink()  # killed before the report: resume reloads the priors from config.yaml
    (run / "summary.json").unlink()
    dfkd("distill", "--resume", run, "--quiet")
    assert json.loads((run / "summary.json").read_text())["bn_priors"] == summary["bn_priors"]

    # a prior of other images is refused with the reason
    other = tmp_path / "other.pt"
    dfkd("train-teacher", "--dataset", "digits", "--arch", "resnet8", "--epochs", 1, "--image-size", 16, "--quiet",
         "--out", other)
    bad = dfkd("distill", "--teacher", teacher, "--method", "fast", "--steps", 2, "--out", tmp_path / "bad",
               "--bn-prior", other, check=False)
    assert bad.returncode == 2 and "shape [1, 16, 16]" in bad.stderr and "Traceback" not in bad.stderr
    missing = dfkd("distill", "--teacher", teacher, "--method", "fast", "--out", tmp_path / "bad", "--overwrite",
                   "--bn-prior", tmp_path / "nope.pt", check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
