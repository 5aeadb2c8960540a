"""Forms of knowledge on top of a method's student loss (``knowledge:``, dfkd.knowledge.terms)."""
import pytest
import torch

from dfkd.core.taps import FeatureTap, block_paths, head_path
from dfkd.knowledge import UnknownKnowledgeError, create_knowledge
from dfkd.knowledge.terms import KnowledgeTerms, parse_knowledge
from generators import create_synthesizer

SMALL = {"ngf": 8, "nz": 16, "synthesis_batch_size": 8, "batch_size": 8, "warmup_rounds": 1}


def test_each_term_is_its_weighted_loss_on_the_tapped_features(bn_teacher, student):
    inner = create_synthesizer("fast", bn_teacher, image_shape=(1, 32, 32), num_classes=10, **SMALL)
    synth = KnowledgeTerms(inner, ["rkd", {"name": "nst", "weight": 2.0}, "dkd:0.5"])
    synth.attach_student(student)
    synth.synthesize(student)
    batch = synth.sample()
    losses, s_logits, t_logits = synth.student_losses(student, batch)
    assert set(losses) == {"kd", "rkd", "nst", "dkd"}
    # by hand: the penultimate features and the last blocks of each, from separate taps
    n = min(len(block_paths(student)), len(block_paths(bn_teacher)))
    s_blocks, t_blocks = list(block_paths(student))[-n:], list(block_paths(bn_teacher))[-n:]
    with FeatureTap(student, [head_path(student)], capture="input") as s_head, \
            FeatureTap(bn_teacher, [head_path(bn_teacher)], capture="input") as t_head, \
            FeatureTap(student, s_blocks) as s_tap, FeatureTap(bn_teacher, t_blocks) as t_tap:
        s = student(batch.images).float()
        with torch.no_grad():
            t = bn_teacher(batch.images).float()
        rkd = create_knowledge("rkd")([s_head[head_path(student)]], [t_head[head_path(bn_teacher)]])
        nst = create_knowledge("nst")([s_tap[p] for p in s_blocks], [t_tap[p] for p in t_blocks])
    assert torch.allclose(losses["rkd"], 1.0 * rkd, rtol=1e-4, atol=1e-6)  # RKD's suggested weight
    assert torch.allclose(losses["nst"], 2.0 * nst, rtol=1e-4, atol=1e-6)
    assert torch.allclose(losses["dkd"], 0.5 * create_knowledge("dkd")(s, t), rtol=1e-4, atol=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())


def test_dkd_warms_up_over_its_share_of_the_planned_steps(bn_teacher, student):
    """mdistiller's warm-up: 20 of 240 epochs, so a run of 1200 steps reaches full weight at step 100."""
    inner = create_synthesizer("fast", bn_teacher, image_shape=(1, 32, 32), num_classes=10, **SMALL)
    synth = KnowledgeTerms(inner, ["dkd"])
    synth.plan(1200)
    synth.attach_student(student)
    synth.synthesize(student)
    batch = synth.sample()
    full = create_knowledge("dkd")
    for step, factor in ((0, 1 / 100), (49, 50 / 100), (150, 1.0)):
        synth.step = step
        losses, s, t = synth.student_losses(student, batch)
        assert torch.allclose(losses["dkd"], factor * full(s, t), rtol=1e-4, atol=1e-7), step
    state = synth.state_dict()
    again = KnowledgeTerms(create_synthesizer("fast", bn_teacher, image_shape=(1, 32, 32), num_classes=10, **SMALL), ["dkd"])
    again.attach_student(student)
    again.load_state_dict(state)
    assert again.step == 151


def test_entries_are_checked_in_one_line():
    assert parse_knowledge(["pkt", "nst:50", {"name": "pkd", "options": {"strategy": "last"}}]) == [
        {"name": "pkt", "weight": None, "options": {}}, {"name": "nst", "weight": 50.0, "options": {}},
        {"name": "pkd", "weight": None, "options": {"strategy": "last"}}]
    with pytest.raises(UnknownKnowledgeError, match="known"):
        parse_knowledge(["telepathy"])
    with pytest.raises(UnknownKnowledgeError, match=r"give NAME\[:WEIGHT\]\[:KEY=VALUE,...\]"):
        parse_knowledge(["rkd:lots"])
    assert parse_knowledge(["crd:0.5:num_negatives=1024,temperature=0.1", "crd::num_negatives=64"]) == [
        {"name": "crd", "weight": 0.5, "options": {"num_negatives": 1024, "temperature": 0.1}},
        {"name": "crd", "weight": None, "options": {"num_negatives": 64}}]
    with pytest.raises(UnknownKnowledgeError, match="options go as KEY=VALUE"):
        parse_knowledge(["crd:0.5:num_negatives"])
    with pytest.raises(UnknownKnowledgeError, match="weight must be a number >= 0"):
        parse_knowledge([{"name": "rkd", "weight": -1}])


def test_a_run_config_takes_entries_with_options_and_refuses_other_items():
    from dfkd.api.config import RunConfig
    from dfkd.config import ConfigError

    entries = [{"name": "crd", "options": {"num_negatives": 64}}, "pkt:2"]
    config = RunConfig.from_layers({"method": "real"}, {"knowledge": entries}).validate()
    assert config.knowledge == entries
    assert RunConfig.from_layers({"knowledge": "pkt"}).knowledge == ["pkt"]
    with pytest.raises(ConfigError, match="knowledge must be a list of strings or mappings"):
        RunConfig.from_layers({"knowledge": [3]})
    with pytest.raises(ConfigError, match="bn_priors must be a list of strings"):  # other lists stay strings
        RunConfig.from_layers({"bn_priors": [{"path": "a.pt"}]})


def test_a_run_with_knowledge_trains_and_resumes_its_parts(bn_teacher, tmp_path):
    """Through dfkd.distill: layer mapping (PKD, adapters built by the probe pass) and VID
    (trainable heads) next to Fast's KD; their parameters are optimised and saved."""
    from dfkd.api import distill
    from teachers import save_checkpoint

    meta = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
            "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "test_accuracy": 0.1, "seed": 0}
    save_checkpoint(tmp_path / "t.pt", bn_teacher, meta)
    result = distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "run"), method="fast", steps=4, no_eval=True,
                     samples=8, device="cpu", progress=False, log_every=2, knowledge=["pkd", "vid:0.1"],
                     options={**SMALL, "student_steps_per_round": 2})
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert len(state["synthesizer"]["knowledge"]) == 2 and state["config"]["knowledge"] == ["pkd", "vid:0.1"]
    assert len(state["optimizer"]["param_groups"]) == 2  # the student, and the losses' trainable parts
    assert result.summary["steps"] == 4
    with pytest.raises(UnknownKnowledgeError):
        distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "bad"), method="fast", steps=1, knowledge=["nope"])
    assert not (tmp_path / "bad").exists()
