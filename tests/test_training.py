"""Supervised training and evaluation on in-memory tensors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from teachers import build_model, default_recipe, evaluate_classifier, freeze, train_classifier
from teachers.training import random_crop_flip


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def test_lenet5_bn_learns_digits(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = build_model("lenet5_bn", 10, 1, 32, mean=[0.2], std=[0.3])
    rows = []
    result = train_classifier(model, xtr, ytr, xte, yte, epochs=3, batch_size=64, progress=False, log=rows.append)
    assert result["test_accuracy"] > 0.8
    assert result["recipe"]["optimizer"] == "adam" and result["recipe"]["lr"] == 1e-3
    assert len(result["history"]) == 3 and rows == result["history"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}
    assert rows[-1]["test_acc"] == result["test_accuracy"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert len(result["per_class_accuracy"]) == 10 and result["seconds"] > 0
    assert not model.training


def test_training_is_seeded():
    torch.manual_seed(0)
    x = torch.rand(96, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("mlp", 2, 1, 8, mean=[0.5], std=[0.5], hidden=(16,))
        runs.append(train_classifier(model, x, y, None, None, epochs=2, batch_size=32, augment="crop_flip",
                                     progress=False, seed=5)["history"])
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]
    assert runs[0][0]["test_acc"] is None


def test_training_rejects_frozen_model_and_bad_args():
    model = build_model("mlp", 2, 1, 8, mean=[0.5], std=[0.5])
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="augment"):
        train_classifier(model, x, y, None, None, epochs=1, augment="mixup", progress=False)
    with pytest.raises(ValueError, match="frozen"):
        train_classifier(freeze(model), x, y, None, None, epochs=1, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        train_classifier(build_model("mlp", 2, 1, 8, mean=[0.5], std=[0.5]), x, y, None, None, epochs=1,
                         schedule="step", progress=False)


def test_constant_schedule_keeps_the_learning_rate():
    """DAFL's official teacher training keeps the learning rate constant: two full-batch SGD
    steps at lr 0.5 equal a hand-written loop; the cosine schedule's second step (lr 0.25) does not."""
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long()

    def fresh():
        torch.manual_seed(1)
        return build_model("mlp", 2, 1, 8, mean=[0.5], std=[0.5], hidden=(16,))

    by_hand = fresh()
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.5, momentum=0.9, nesterov=True)  # the sgd recipe
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(by_hand(x), y).backward()
        opt.step()
    trained = {}
    for schedule in ("constant", "cosine"):
        model = fresh()
        result = train_classifier(model, x, y, None, None, epochs=2, batch_size=64, optimizer="sgd", lr=0.5,
                                  weight_decay=0.0, augment="none", schedule=schedule, progress=False)
        assert result["recipe"]["schedule"] == schedule
        trained[schedule] = list(model.parameters())
    same = [torch.allclose(a, b, atol=1e-6) for a, b in zip(trained["constant"], by_hand.parameters())]
    assert all(same)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(trained["cosine"], by_hand.parameters()))


def test_default_recipe():
    assert default_recipe("lenet5_bn") == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
    assert default_recipe("mlp")["optimizer"] == "adam"
    sgd = default_recipe("wrn40_2")
    assert sgd == {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    assert default_recipe("resnet20") == default_recipe("tv:resnet18") == sgd


def test_random_crop_flip_matches_reference():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 6, 7)
    offsets = torch.randint(0, 5, (5, 2))
    flips = torch.tensor([True, False, True, False, True])
    out = random_crop_flip(x, offsets, flips, pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(5):
        r, c = offsets[i].tolist()
        ref = padded[i, :, r : r + 6, c : c + 7]
        if flips[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref)
    centre = random_crop_flip(x, torch.full((5, 2), 2), None)
    torch.testing.assert_close(centre, x)


class _Fixed(nn.Module):
    """Predicts the class stored in the first pixel."""

    def forward(self, x):
        return F.one_hot(x[:, 0, 0, 0].long(), 3).float()


def test_evaluate_classifier_confusion():
    pred = torch.tensor([0, 0, 1, 1, 1, 0])
    y = torch.tensor([0, 1, 1, 1, 0, 0])
    x = pred.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    res = evaluate_classifier(_Fixed(), x, y, batch_size=4)
    assert res["accuracy"] == pytest.approx(4 / 6)
    assert res["confusion"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert res["per_class_accuracy"] == [pytest.approx(2 / 3), pytest.approx(2 / 3), None]
    assert torch.equal(res["predictions"], pred)
