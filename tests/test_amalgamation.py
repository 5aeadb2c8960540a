"""Feature amalgamation: MMD, layer specs, the four methods, shape errors, the synthesizer wrapper."""
import math

import pytest
import torch
import torch.nn.functional as F

from dfkd.core.losses import attention_transfer_loss
from dfkd.multi.ensemble import TeacherEnsemble
from dfkd.multi.features import AmalgamationError, FeatureAmalgamator, LayerPair, default_layers, mmd, parse_layers
from dfkd.multi.synthesizer import AmalgamationSynthesizer
from generators.base import Synthesizer, SyntheticBatch
from teachers import build_model

SHAPE = (1, 32, 32)


def member(name, classes, seed):
    torch.manual_seed(seed)
    model = build_model("lenet5_bn", len(classes), 1, 32, (0.3,), (0.35,))
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *SHAPE))
    meta = {"dataset": "digits", "classes": list(classes), "image_shape": list(SHAPE)}
    return name, model.eval(), meta


@pytest.fixture
def ensemble():
    return TeacherEnsemble([member("a", range(5), 0), member("b", range(5, 10), 1)], combine="concat")


@pytest.fixture
def student():
    torch.manual_seed(3)
    return build_model("lenet5_half", 10, 1, 32, (0.3,), (0.35,))


# ----------------------------------------------------------------------------- MMD
def test_mmd_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0]])

    def k(d2, sigmas):
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    for sigmas in ([1.0], [0.5, 2.0]):
        xx = (2 * k(0, sigmas) + 2 * k(1, sigmas)) / 4
        yy = k(0, sigmas)
        xy = (k(1, sigmas) + k(2, sigmas)) / 2
        assert math.isclose(mmd(x, y, sigmas).item(), xx + yy - 2 * xy, rel_tol=1e-5)
    assert abs(mmd(x, x, [1.0]).item()) < 1e-6
    near, far = mmd(x, x + 0.1, [1.0]).item(), mmd(x, x + 1.0, [1.0]).item()
    assert 0 < near < far


# ----------------------------------------------------------------------------- layer specs
def test_parse_layers_handles_dotted_names_and_reports_errors():
    names = ["t", "t.v1"]
    pairs = parse_layers("relu3:t.v1.layer1.0, maxpool2:t.conv2", names)
    assert pairs == [LayerPair("relu3", "t.v1", "layer1.0"), LayerPair("maxpool2", "t", "conv2")]
    with pytest.raises(AmalgamationError, match="unknown member 'c'"):
        parse_layers([("relu3", "c", "relu3")], names)
    with pytest.raises(AmalgamationError, match="bad layer pair 'relu3'"):
        parse_layers("relu3", names)
    with pytest.raises(AmalgamationError, match="empty"):
        parse_layers("", names)


def test_default_layers_pair_the_last_blocks(ensemble, student):
    assert [str(p) for p in default_layers(ensemble, student)] == ["relu3:a.relu3", "relu3:b.relu3"]


# ----------------------------------------------------------------------------- methods
def test_hint_pools_and_regresses_by_hand(ensemble, student):
    amal = FeatureAmalgamator(ensemble, student, "maxpool1:a.relu3", method="hint")
    x = torch.rand(4, *SHAPE)
    terms = amal.losses(x)
    with torch.no_grad():
        fs = student.net.maxpool1(student.net.relu1(student.net.bn1(student.net.conv1((x - student.mean) / student.std))))
        net = ensemble.members[0].net
        h = (x - ensemble.members[0].mean) / ensemble.members[0].std
        h = net.maxpool1(net.relu1(net.bn1(net.conv1(h))))
        h = net.maxpool2(net.relu2(net.bn2(net.conv2(h))))
        ft = net.relu3(net.bn3(net.conv3(h)))
        expected = F.mse_loss(amal.adapters["hint0"](fs).mean(dim=(2, 3), keepdim=True), ft)
    assert torch.allclose(terms["hint"], expected, atol=1e-6)
    amal.close()


def test_attention_matches_the_shared_loss(ensemble, student):
    amal = FeatureAmalgamator(ensemble, student, "maxpool1:a.maxpool1,maxpool1:b.maxpool1", method="attention")
    assert list(amal.parameters()) == []
    x = torch.rand(4, *SHAPE)
    terms = amal.losses(x)
    s_tap, t_a, t_b = amal.student_tap, amal.teacher_taps["a"], amal.teacher_taps["b"]
    student(x), ensemble(x)
    expected = (attention_transfer_loss(s_tap["maxpool1"], t_a["maxpool1"])
                + attention_transfer_loss(s_tap["maxpool1"], t_b["maxpool1"]))
    assert torch.allclose(terms["attention"], expected, atol=1e-6) and terms["attention"] > 0
    amal.close()


@pytest.mark.parametrize("method,names", [("cfl", {"cfl_mmd", "cfl_recon"}), ("layerwise_ae", {"ae_recon", "ae_align"}),
                                          ("hint", {"hint"}), ("attention", {"attention"})])
def test_each_method_trains_adapters_and_student(ensemble, student, method, names):
    spec = "maxpool2:a.maxpool2,maxpool2:b.maxpool2"
    amal = FeatureAmalgamator(ensemble, student, spec, method=method, **({"common_channels": 16} if method == "cfl" else {}))
    params = list(amal.parameters())
    if method == "layerwise_ae":
        assert amal.adapters["group0"]["enc"].in_channels == 32  # 16 + 16 teacher channels concatenated
    if method == "cfl":
        assert amal.adapters["group0"]["enc_s"].out_channels == 16
    optimizer = torch.optim.Adam(list(student.parameters()) + params, lr=1e-2)
    torch.manual_seed(0)
    x = torch.rand(32, *SHAPE)
    first = None
    for _ in range(15):
        terms = amal.losses(x)
        assert set(terms) == names
        total = sum(terms.values())
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        assert student.net.conv1.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in params)
        optimizer.step()
    assert sum(amal.losses(x).values()).item() < first
    amal.close()


def test_shapes_no_adapter_can_bridge_are_errors_naming_the_layers(ensemble, student):
    with pytest.raises(AmalgamationError, match=r"student\.fc1 \[42\], a\.relu3 \[120, 1, 1\]"):
        FeatureAmalgamator(ensemble, student, "fc1:a.relu3", method="hint")
    with pytest.raises(AmalgamationError, match=r"a\.maxpool1 \(14x14\) cannot be pooled evenly to 5x5"):
        FeatureAmalgamator(ensemble, student, "maxpool2:a.maxpool1", method="cfl")
    with pytest.raises(AmalgamationError, match="attention transfer needs 4-D"):
        FeatureAmalgamator(ensemble, student, "fc1:a.fc1", method="attention")
    with pytest.raises(AmalgamationError, match="known: cfl"):
        FeatureAmalgamator(ensemble, student, "fc1:a.fc1", method="fitnets")
    # failed constructions left no hooks behind
    assert all(not m._forward_hooks for t in ensemble.members for m in t.modules())
    assert all(not m._forward_hooks for m in student.modules())


# ----------------------------------------------------------------------------- the wrapper
class FixedBatches(Synthesizer):
    """A minimal synthesizer: fixed images, KD by default."""

    name = "fixed"

    def __init__(self, teacher):
        super().__init__(teacher, SHAPE, 10)
        self.images = torch.rand(16, *SHAPE)

    def synthesize(self, student):
        return {}

    def sample(self):
        return SyntheticBatch(self.images)

    def state_dict(self):
        return {"n": 1}

    def load_state_dict(self, state):
        assert state == {"n": 1}


def test_wrapper_leaves_adapters_to_the_engine_optimizer(ensemble, student):
    synth = AmalgamationSynthesizer(FixedBatches(ensemble), ensemble, combine="entropy_weighted", features="cfl",
                                    layers="relu3:a.relu3,relu3:b.relu3", feature_weight=0.5)
    synth.attach_student(student)
    losses, _, _ = synth.student_losses(student, synth.sample())
    assert set(losses) == {"kd", "cfl_mmd", "cfl_recon"}
    state = synth.state_dict()
    assert "features" in state
    synth.load_state_dict(state)

    claimed = AmalgamationSynthesizer(FixedBatches(ensemble), ensemble, features="hint", layers="relu3:a.relu3")
    claimed.attach_student(student)
    params = claimed.extra_parameters()
    assert [p.shape for p in params] == [torch.Size([120, 60, 1, 1]), torch.Size([120])]
    before = params[0].detach().clone()
    for _ in range(2):
        losses, _, _ = claimed.student_losses(student, claimed.sample())
        sum(losses.values()).backward()
    assert torch.equal(params[0].detach(), before)  # left to the engine's optimizer
    assert params[0].grad is not None


def test_wrapper_targets_and_losses(ensemble, student):
    inner = FixedBatches(ensemble)
    synth = AmalgamationSynthesizer(inner, ensemble, combine="noisy", combine_options={"sigma": 0.5})
    synth.attach_student(student)
    batch = synth.sample()
    losses, s_logits, merged = synth.student_losses(student, batch)
    assert set(losses) == {"kd"} and synth.name == "fixed" and synth.options is inner.options
    clean = ensemble(batch.images)  # the ensemble's own combiner: no noise
    assert not torch.allclose(merged, clean)
    from dfkd.core.losses import kd_loss

    assert torch.allclose(losses["kd"], kd_loss(s_logits, merged))
    method = AmalgamationSynthesizer(FixedBatches(ensemble), ensemble, student_loss="method")
    losses, _, merged = method.student_losses(student, batch)
    assert set(losses) == {"kd"} and torch.allclose(merged, clean)
    with pytest.raises(ValueError, match="student_loss"):
        AmalgamationSynthesizer(inner, ensemble, student_loss="mine")
    with pytest.raises(AmalgamationError, match="known: cfl"):
        AmalgamationSynthesizer(inner, ensemble, features="fitnets")


def test_the_engine_trains_the_adapters(ensemble, student, tmp_path):
    """The engine optimises ``extra_parameters()`` with the student: the adapters learn."""
    from dfkd.engine.run import DistillationRun, RunOptions

    synth = AmalgamationSynthesizer(FixedBatches(ensemble), ensemble, combine="concat", features="hint",
                                    layers="relu3:a.relu3,relu3:b.relu3")
    meta = dict(ensemble.meta(), class_names=[str(c) for c in range(10)], seed=0)
    run = DistillationRun(ensemble, student, synth, tmp_path, RunOptions(steps=3, log_every=0, progress=False),
                          student_meta=meta)
    weight = synth.amalgamator.adapters["hint0"].weight
    before = weight.detach().clone()
    summary = run.run()
    assert summary["steps"] == 3 and not torch.equal(weight.detach(), before)
    assert len(run.optimizer.param_groups) == 2  # the adapters' group, stepped with the student
