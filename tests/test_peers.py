"""Peer and online teachers: deep mutual learning (``peers:``, dfkd.knowledge.peers) and
born-again generations (``dfkd.born_again``)."""
import json

import pytest
import torch

from dfkd.engine.evaluation import EvalData
from dfkd.engine.run import DistillationRun, RunOptions
from dfkd.knowledge.peers import PeerCohort, PeerError, mutual_loss
from dfkd.knowledge.terms import KnowledgeTerms
from generators import create_synthesizer
from teachers import build_model, freeze

META = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
        "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "test_accuracy": 0.1, "seed": 0}


def test_mutual_term_is_the_dml_formula_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    peers = [torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])]

    def kl(p, q):  # KL(p || q) summed over classes, averaged over the batch
        return float(sum(sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)) / len(p))

    q = student.detach().softmax(1)
    by_hand = (kl(peers[0].softmax(1), q) + kl(peers[1].softmax(1), q)) / 2
    value = mutual_loss(student, peers)
    assert value.item() == pytest.approx(by_hand, rel=1e-5)
    value.backward()  # the gradient is the student's alone: the peers' probabilities are constants
    grad = (student.detach().softmax(1) - torch.stack(peers).softmax(2).mean(0)) / 2
    assert torch.allclose(student.grad, grad, atol=1e-6)
    with pytest.raises(PeerError):
        mutual_loss(student, [])


def _teacher():
    torch.manual_seed(0)
    teacher = build_model("lenet5_bn", 10, 1, 32, (0.3,), (0.35,))
    teacher.train()
    with torch.no_grad():
        teacher(torch.rand(32, 1, 32, 32))
    return freeze(teacher)


def _cohort(teacher, n_peers=2, knowledge=None, seed=0):
    synth = create_synthesizer("dafl", teacher, image_shape=(1, 32, 32), num_classes=10, seed=seed, batch_size=16, ngf=8)
    if knowledge:
        synth = KnowledgeTerms(synth, knowledge)
    return PeerCohort(synth, n_peers, "lenet5_half", (0.3,), (0.35,), seed=seed)


def test_student_and_peers_terms_and_gradients(bn_teacher, student):
    """Each network's terms: the student's method loss (and a knowledge term inside) plus
    ``mutual``; each peer's KD to the teacher plus its mutual term to the two others."""
    from dfkd.core.losses import kd_loss

    synth = _cohort(bn_teacher, knowledge=["dkd"])
    synth.attach_student(student)
    synth.synthesize(student)
    batch = synth.sample()
    losses, s_logits, t_logits = synth.student_losses(student, batch)
    assert set(losses) == {"kd", "dkd", "mutual", "peer1_kd", "peer1_mutual", "peer2_kd", "peer2_mutual"}
    with torch.no_grad():
        p1, p2 = (peer(batch.images) for peer in synth.peers)
    assert torch.allclose(losses["mutual"], mutual_loss(s_logits, [p1, p2]), atol=1e-6)
    assert torch.allclose(losses["peer1_mutual"], mutual_loss(p1, [s_logits, p2]), atol=1e-6)
    assert torch.allclose(losses["peer2_kd"], kd_loss(p2, t_logits, synth.temperature), atol=1e-6)
    # one backward of the sum: the student's gradient is its own loss's
    student.zero_grad()
    sum(losses.values()).backward()
    both = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    losses, s_logits, _ = synth.student_losses(student, batch)
    (losses["kd"] + losses["dkd"] + losses["mutual"]).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(both, student.parameters()))
    assert len(synth.extra_parameters()) == 2 * len(list(student.parameters()))


def _run(run_dir, steps=12, seed=0):
    teacher = _teacher()
    torch.manual_seed(seed)
    student = build_model("lenet5_half", 10, 1, 32, (0.3,), (0.35,))
    synth = _cohort(teacher, seed=seed)
    eval_data = EvalData(torch.rand(40, 1, 32, 32), torch.randint(0, 10, (40,)))
    return DistillationRun(teacher, student, synth, run_dir, RunOptions(steps=steps, eval_every=6, log_every=3,
                           checkpoint_every=4, progress=False), eval_data=eval_data, student_meta=dict(META))


def test_peers_learn_are_saved_and_resume_bit_for_bit(tmp_path):
    full = _run(tmp_path / "full", steps=24)
    initial = [p.detach().clone() for p in full.synth.peers.parameters()]
    full.run()
    assert all(not torch.equal(a, b) for a, b in zip(initial, full.synth.peers.parameters()))  # trained
    kd = [row["peer1_kd"] for row in full.metrics]
    assert kd[-1] < kd[0]  # the peer's loss falls
    state = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    assert len(state["synthesizer"]["peers"]) == 2

    killed = _run(tmp_path / "killed", steps=24)
    original = killed.synth.synthesize

    def dying(student):
        if killed.step >= 10:
            raise KeyboardInterrupt
        return original(student)

    killed.synth.synthesize = dying
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = _run(tmp_path / "killed", steps=24)
    resumed.load_state()
    assert 0 < resumed.step < 24
    resumed.run()
    for a, b in zip(full.synth.peers.state_dict().values(), resumed.synth.peers.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    import dfkd

    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    dfkd.train_teacher(dataset="digits", arch="lenet5_bn", epochs=2, out=str(path), progress=False)
    return path


REAL = {"method": "real", "steps": 20, "batch_size": 64, "samples": 16, "device": "cpu", "student_lr": 0.01}


def _accuracy(model, images, labels):
    from dfkd.engine.evaluation import match_rate, predict

    return match_rate(predict(model, images, "cpu"), labels)


@pytest.mark.slow
def test_a_dml_run_reports_and_saves_its_peers(digits_teacher, tmp_path):
    """Through dfkd.distill on real transfer images, with a knowledge term inside the cohort: each
    peer's accuracy in summary.json is the one of the weights saved in state.pt."""
    import dfkd
    from dfkd.config import ConfigError
    from dfkd.data import load_dataset

    run = dfkd.distill(teacher=str(digits_teacher), out=str(tmp_path / "dml"), peers=3, knowledge=["dkd"],
                       progress=False, **REAL)
    assert [row["name"] for row in run.summary["peers"]] == ["peer1", "peer2"]
    state = torch.load(run.run_dir / "state.pt", weights_only=True)
    test = load_dataset("digits", "test", classes=list(range(10)), image_size=32)
    student, meta = run.load_student()
    for row, weights in zip(run.summary["peers"], state["synthesizer"]["peers"]):
        peer = build_model("lenet5_half", 10, 1, 32, meta["mean"], meta["std"])
        peer.load_state_dict(weights)
        assert row["accuracy"] == pytest.approx(_accuracy(peer, test.images, test.labels), abs=1e-9)
    assert 0 <= run.summary["cohort_accuracy"] <= 1
    assert {"mutual", "peer2_kd", "peer2_mutual", "dkd"} <= set(state["metrics"][-1])
    with pytest.raises(ConfigError, match="peers >= 2"):
        dfkd.distill(teacher=str(digits_teacher), out=str(tmp_path / "bad"), peer_arch="lenet5", **REAL)
    with pytest.raises(ConfigError, match="peers must be at least 1"):
        dfkd.distill(teacher=str(digits_teacher), out=str(tmp_path / "bad"), peers=0, **REAL)


@pytest.mark.slow
def test_born_again_generations_and_their_ensemble(digits_teacher, tmp_path, capsys):
    """Two generations through the command line: gen1, gen2 and born_again.json; the ensemble's
    accuracy is the mean of the two students' probabilities by hand; --resume completes a
    generation that did not finish."""
    from dfkd.cli import main
    from dfkd.data import load_dataset
    from teachers import load_checkpoint

    out = tmp_path / "ban"
    flags = ["--method", "real", "--steps", "20", "--batch-size", "64", "--samples", "16", "--device", "cpu",
             "--student-lr", "0.01", "--quiet"]
    assert main(["born-again", "--teacher", str(digits_teacher), "--generations", "2", *flags, "--out", str(out)]) == 0
    record = json.loads((out / "born_again.json").read_text())
    assert [g["run_dir"] for g in record["generations"]] == ["gen1", "gen2"]
    assert record["generations"][1]["teacher"] == str(out / "gen1" / "student.pt")
    for gen in ("gen1", "gen2"):
        assert (out / gen / "report.md").exists()
    test = load_dataset("digits", "test", classes=list(range(10)), image_size=32)
    students = [load_checkpoint(out / gen / "student.pt")[0].eval() for gen in ("gen1", "gen2")]
    with torch.no_grad():
        probs = [s(test.images).softmax(1) for s in students]
    by_hand = float(((probs[0] + probs[1]) / 2).argmax(1).eq(test.labels).float().mean())
    assert record["ensemble_accuracy"] == pytest.approx(by_hand, abs=1e-9)
    assert record["generations"][0]["student_accuracy"] == pytest.approx(_accuracy(students[0], test.images, test.labels))
    assert "born-again ensemble" in capsys.readouterr().out

    # an unfinished second generation: --resume completes it and the record
    (out / "gen2" / "report.md").unlink()
    (out / "born_again.json").unlink()
    assert main(["born-again", "--resume", str(out), "--quiet"]) == 0
    again = json.loads((out / "born_again.json").read_text())
    assert again["ensemble_accuracy"] == record["ensemble_accuracy"]
    # a new run into it is refused, and so are nonsense generations
    assert main(["born-again", "--teacher", str(digits_teacher), *flags, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["born-again", "--teacher", str(digits_teacher), "--generations", "0", *flags,
                 "--out", str(tmp_path / "zero")]) == 2
    err = capsys.readouterr().err
    assert "--generations must be" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "zero").exists()
    # a chain whose first generation cannot start leaves nothing behind
    assert main(["born-again", "--teacher", str(tmp_path / "missing.pt"), *flags, "--out", str(tmp_path / "none")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_born_again_from_the_ensemble_of_earlier_generations(digits_teacher, tmp_path):
    import dfkd

    result = dfkd.born_again(teacher=str(digits_teacher), generations=3, teacher_of_next="ensemble",
                             out=str(tmp_path / "ens"), progress=False, **REAL)
    gens = result.record["generations"]
    assert gens[2]["teacher"] == str(tmp_path / "ens" / "teachers-gen3.yaml")
    summary = json.loads((tmp_path / "ens" / "gen3" / "summary.json").read_text())
    assert [m["name"] for m in summary["teachers"]] == ["gen1", "gen2"] and summary["combine"] == "mean_prob"
    assert result.ensemble_accuracy == gens[2]["ensemble_accuracy"] and len(result.runs) == 3
