"""``dfkd.train_teacher``: supervised training of a teacher on a real data set, written as a
zoo checkpoint with its metadata."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dfkd.api.config import TeacherConfig
from dfkd.api.results import RunError
from dfkd.data import DatasetInfo, load_dataset, parse_classes
from generators.activation_records import RECORDS_KEY, record_activations
from teachers import build_model, save_checkpoint, train_classifier
from teachers.device import resolve_device, seed_everything


@dataclass
class TeacherResult:
    """A trained teacher: where its checkpoint is and how it did on the test split."""

    path: Path
    test_accuracy: float
    seconds: float
    test_images: int
    dataset: str


def dataset_meta(info: DatasetInfo) -> dict:
    """Checkpoint metadata of a data set (``dataset`` is its registry name)."""
    meta = info.to_meta()
    meta["dataset"] = meta.pop("name")
    return meta


def train_teacher(config: TeacherConfig | dict | None = None, *, progress: bool = True, say=lambda text: None,
                  **fields) -> TeacherResult:
    """Train ``config.arch`` on ``config.dataset`` with labels and write ``config.out``
    (``dfkd.train_teacher(dataset="digits", arch="lenet5_bn", epochs=5, out="t.pt")``)."""
    base = config.to_dict() if isinstance(config, TeacherConfig) else dict(config or {})
    config = TeacherConfig.from_layers(base, fields).validate()
    cfg = config.to_dict()
    if not cfg["out"]:
        raise RunError("train-teacher needs --out PATH.pt (where to write the teacher checkpoint)")
    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    classes = parse_classes(cfg["classes"])
    split = dict(root=cfg["data_root"], download=cfg["download"], classes=classes, image_size=cfg["image_size"])
    train, test = load_dataset(cfg["dataset"], "train", **split), load_dataset(cfg["dataset"], "test", **split)
    info = train.info
    channels, height, _ = info.image_shape
    model = build_model(cfg["arch"], info.num_classes, channels, height, info.mean, info.std).to(device)
    say(f"training {cfg['arch']} on {info.name} ({len(train)} images, {info.num_classes} classes) "
        f"for {cfg['epochs']} epochs on {device}")
    recipe = {k: cfg[k] for k in ("optimizer", "lr", "weight_decay") if cfg[k] is not None}
    started = time.perf_counter()
    result = train_classifier(model, train.images, train.labels, test.images, test.labels, epochs=cfg["epochs"],
                              batch_size=cfg["batch_size"], augment=cfg["augment"], schedule=cfg["schedule"], seed=cfg["seed"], device=device,
                              progress=progress, **recipe)
    seconds = time.perf_counter() - started
    meta = dataset_meta(info)
    meta.update(test_accuracy=float(result["test_accuracy"]), seed=cfg["seed"], config=cfg,
                train_seconds=round(seconds, 1), per_class_accuracy=result["per_class_accuracy"])
    if cfg["record_metadata"]:  # while the training data is at hand (generators.lopes)
        meta[RECORDS_KEY] = record_activations(model, train.images, train.labels, info.num_classes, device=device)
    path = save_checkpoint(cfg["out"], model.cpu(), meta)
    return TeacherResult(Path(path), float(result["test_accuracy"]), seconds, len(test), info.name)
