"""Lopes et al. 2017: activation records, the reconstruction loss, reconstruction and the
command line from --record-metadata to a distillation run."""
import json

import pytest
import torch

from dfkd.api.teacher import dataset_meta
from dfkd.data import dataset_info
from generators import SynthesizerOptionError, create_synthesizer
from generators.activation_records import RECORDS_KEY, matching_loss, record_activations, sample_targets
from teachers import build_model, freeze, save_checkpoint
from tests.test_cli import dfkd


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return build_model("lenet5_bn", 3, 1, 32, [0.5], [0.5]).eval()


def tiny_data(n=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 32, 32), generator=g), torch.arange(n) % 3


def test_records_equal_a_hand_computation():
    model, (images, labels) = tiny_teacher(), tiny_data()
    records = record_activations(model, images, labels, 3, temperature=8.0, batch_size=5)
    layers = {layer["path"]: layer for layer in records["layers"]}
    assert [layer["path"] for layer in records["layers"]] == ["relu1", "relu2", "relu3", "relu4", "logits"]
    assert records["counts"] == [6, 6, 6] and records["temperature"] == 8.0
    assert layers["relu1"]["cov"] is None and layers["relu4"]["cov"] is not None  # 4704 units: std only

    seen = {}
    handle = model.net.relu4.register_forward_pre_hook(lambda m, i: seen.update(a=i[0]))
    with torch.no_grad():
        top = model(images) / 8.0
    handle.remove()
    for name, acts in (("logits", top), ("relu4", seen["a"])):
        for c in range(3):
            rows = acts[labels == c].double()
            mean = rows.mean(0)
            torch.testing.assert_close(layers[name]["mean"][c], mean.float(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layers[name]["std"][c], rows.std(0, correction=0).float(), atol=1e-5, rtol=1e-4)
            cov = (rows - mean).T @ (rows - mean) / rows.shape[0]  # population covariance
            torch.testing.assert_close(layers[name]["cov"][c], cov.float(), atol=1e-5, rtol=1e-4)


def test_sampling_modes():
    layer = {"mean": torch.tensor([[1.0, 2.0]]), "std": torch.tensor([[0.5, 0.1]]),
             "cov": torch.tensor([[[4.0, 0.0], [0.0, 0.25]]])}
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(3))
    official = sample_targets(layer, 0, 4, "official", torch.Generator().manual_seed(3))
    torch.testing.assert_close(official, layer["mean"][0] + z @ layer["cov"][0])  # mean + z cov
    gaussian = sample_targets(layer, 0, 4, "gaussian", torch.Generator().manual_seed(3))
    torch.testing.assert_close(gaussian, layer["mean"][0] + z * torch.tensor([2.0, 0.5]))  # mean + z cov^(1/2)
    diagonal = sample_targets(layer, 0, 4, "diagonal", torch.Generator().manual_seed(3))
    torch.testing.assert_close(diagonal, layer["mean"][0] + z * layer["std"][0])


def test_reconstruction_loss_equals_a_hand_computation():
    a1, h1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    a2, h2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[-1.0, 2.0, 5.0]])
    # relu: a1 -> [[1,0],[.5,3]], h1 -> [[0,1],[2,0]]: squared gaps 1, 1, 2.25, 9
    top = (1 + 1 + 2.25 + 9) / 4
    assert matching_loss([a1], [h1], normalise=False).item() == pytest.approx(top)
    # all layers: each layer's mean divided by its size once more
    second = (1 + 0 + 4) / 3
    assert matching_loss([a1, a2], [h1, h2], normalise=True).item() == pytest.approx(top / 2 + second / 3)


@pytest.mark.parametrize("objective", ["top_layer", "all_layers"])
def test_reconstructions_match_their_targets_better_than_noise(objective):
    teacher, (images, labels) = freeze(tiny_teacher()), tiny_data(30)
    records = record_activations(teacher, images, labels, 3)
    synth = create_synthesizer("lopes", teacher, image_shape=(1, 32, 32), num_classes=3, records=records, seed=0,
                               objective=objective, iterations=40, lr=0.05, synthesis_batch_size=8, num_images=24)
    for cls in range(3):
        targets = synth.sample_layer_targets(cls, 8)
        noise = synth.initial_images(8).clamp(0, 1)
        x = noise.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.05)
        for _ in range(40):
            loss = synth.loss(x, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            assert synth.loss(x.detach(), targets).item() < 0.5 * synth.loss(noise, targets).item()
    stats = synth.synthesize(None)  # the whole set: 3 batches of 8, one class each, in [0, 1]
    assert len(synth.pool) == 24 and synth.pool.label_counts(3).tolist() == [8, 8, 8]
    assert set(stats) == {"lopes_rec", "lopes_target_match"}


def test_synthesize_makes_every_image_once_in_one_class_per_batch():
    teacher, (images, labels) = freeze(tiny_teacher()), tiny_data(12)
    records = record_activations(teacher, images, labels, 3, all_layers=False)
    assert [layer["path"] for layer in records["layers"]] == ["logits"]
    synth = create_synthesizer("lopes", teacher, image_shape=(1, 32, 32), num_classes=3, records=records,
                               num_images=20, synthesis_batch_size=8, iterations=2, batch_size=5)
    synth.synthesize(None)
    synth.synthesize(None)  # nothing left to make
    assert synth.images_synthesized == 20 and len(synth.pool) == 20
    assert synth.pool.label_counts(3).tolist() == [8, 8, 4]
    batch = synth.sample().images
    assert batch.shape == (5, 1, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(SynthesizerOptionError, match="hidden-layer records"):
        create_synthesizer("lopes", teacher, image_shape=(1, 32, 32), num_classes=3, records=records,
                           objective="all_layers")


def test_a_teacher_without_records_is_refused_in_one_line(tmp_path):
    with pytest.raises(SynthesizerOptionError, match="record-metadata"):
        create_synthesizer("lopes", tiny_teacher(), image_shape=(1, 32, 32), num_classes=3)
    info = dataset_info("digits")
    model = build_model("lenet5_bn", info.num_classes, 1, 32, info.mean, info.std)
    path = save_checkpoint(tmp_path / "plain.pt", model, {**dataset_meta(info), "test_accuracy": None, "seed": 0})
    proc = dfkd("distill", "--teacher", path, "--method", "lopes", "--steps", 2, "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "dfkd train-teacher --record-metadata" in proc.stderr and "activation records" in proc.stderr


@pytest.fixture(scope="module")
def recorded_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("lopes") / "teacher.pt"
    dfkd("train-teacher", "--dataset", "digits", "--arch", "lenet5_bn", "--epochs", 1, "--record-metadata",
         "--quiet", "--out", path)
    return path


def test_record_metadata_stores_the_records_in_the_checkpoint(recorded_teacher):
    meta = torch.load(recorded_teacher, weights_only=True)["meta"]
    records = meta[RECORDS_KEY]
    assert meta["config"]["record_metadata"] is True and sum(records["counts"]) > 1000
    assert [layer["path"] for layer in records["layers"]] == ["relu1", "relu2", "relu3", "relu4", "logits"]


def test_distill_with_lopes_on_digits_runs_end_to_end(recorded_teacher, tmp_path):
    run = tmp_path / "run"
    dfkd("distill", "--teacher", recorded_teacher, "--method", "lopes", "--steps", 3, "--quiet", "--no-eval",
         "--out", run, "batch_size=16", "samples=16", "options.num_images=20", "options.synthesis_batch_size=10",
         "options.iterations=3", "options.objective=all_layers")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lopes" and summary["steps"] == 3
    assert (run / "report.md").exists()
