"""teachers: the dfkd model zoo.

Architectures and their registry (:mod:`teachers.registry`, :mod:`teachers.models`), the
input-normalisation wrapper and ``freeze`` (:mod:`teachers.normalize`), checkpoints with
metadata (:mod:`teachers.checkpoint`), zoo manifests (:mod:`teachers.zoo`) and supervised
teacher training (:mod:`teachers.training`). This package imports neither ``dfkd`` nor
``generators``.
"""
from teachers import models  # noqa: F401  (registers the built-in architectures)
from teachers.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    import_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    sha256_file,
)
from teachers.factory import create_model
from teachers.normalize import NormalizedModel, build_model, freeze, is_frozen
from teachers.pretrained import PretrainedError, is_pretrained_spec, load_pretrained
from teachers.registry import Registry, UnknownModelError, list_models, register_model
from teachers.training import default_recipe, evaluate_classifier, train_classifier
from teachers.zoo import (
    ZOO_FORMAT,
    ZooEntry,
    ZooError,
    build_manifest,
    describe_manifest,
    format_table,
    load_manifest,
    load_zoo,
    verify_manifest,
)


def load_teacher(spec, map_location="cpu"):
    """A teacher and its metadata from a checkpoint file or a pretrained name
    (``tv:NAME:WEIGHTS``, ``timm:NAME``; :mod:`teachers.pretrained`)."""
    if is_pretrained_spec(spec):
        return load_pretrained(spec, map_location)
    return load_checkpoint(spec, map_location)


__all__ = [
    "load_teacher",
    "load_pretrained",
    "PretrainedError",
    "Registry",
    "UnknownModelError",
    "register_model",
    "create_model",
    "list_models",
    "NormalizedModel",
    "build_model",
    "freeze",
    "is_frozen",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "import_state_dict",
    "sha256_file",
    "ZOO_FORMAT",
    "ZooEntry",
    "ZooError",
    "build_manifest",
    "load_manifest",
    "verify_manifest",
    "describe_manifest",
    "format_table",
    "load_zoo",
    "default_recipe",
    "train_classifier",
    "evaluate_classifier",
]
