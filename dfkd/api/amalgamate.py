"""``dfkd.amalgamate``: distill a whole teacher zoo into one student over the union of classes.

The zoo's teachers become a :class:`dfkd.multi.ensemble.TeacherEnsemble` that drives the
chosen synthesizer (``method="real"`` samples real unlabeled training images of ``dataset``
instead: the upper bound); the student's loss is the combiner's (KD against the merged
target, or ``combine="uhc"``) plus the feature-amalgamation terms. The run directory is the
one :func:`dfkd.distill` writes, and ``summary.json`` also holds ``ensemble_accuracy`` and
``teachers``: each member's accuracy on its own classes of the test split, with the
student's accuracy on the same images (``student_accuracy_on_classes``).
"""
from __future__ import annotations

import torch

from dfkd.api.config import AmalgamateConfig
from dfkd.api.results import RunError, RunResult
from dfkd.api.runs import execute, resume_config
from dfkd.data import list_datasets, load_dataset, open_dataset
from dfkd.engine.evaluation import match_rate, predict
from dfkd.multi.ensemble import TeacherEnsemble, adapt_input
from dfkd.multi.per_member import PerMemberSynthesizer, resolve_synthesis
from dfkd.multi.placement import parse_member_devices
from dfkd.multi.synthesizer import AmalgamationSynthesizer
from generators import create_synthesizer, synthesizer_class


def _accuracy(model, images, labels, device) -> float:
    return match_rate(predict(model, images, device), labels)


def member_report(ensemble: TeacherEnsemble, student, data_root, device) -> list[dict]:
    """Each member on its own classes of its test split, and the student on those images."""
    rows = []
    for i, (name, member, meta) in enumerate(zip(ensemble.names, ensemble.members, ensemble.metas)):
        dataset = meta.get("dataset")
        row = {"name": name, "arch": getattr(member, "arch", None), "dataset": dataset,
               "classes": list(meta["classes"]), "union_index": ensemble.index(i).tolist()}
        try:
            test = load_dataset(dataset, "test", root=data_root, classes=list(meta["classes"]),
                                image_size=int(meta["image_shape"][1]))
        except Exception as exc:  # a member whose data set is not available here
            row["error"] = str(exc)
            rows.append(row)
            continue
        row["accuracy"] = _accuracy(member, test.images, test.labels, device)
        union_labels = ensemble.index(i).cpu()[test.labels]
        images = test.images
        if tuple(images.shape[1:]) != tuple(ensemble.image_shape):
            images = adapt_input(images, ensemble.image_shape)
        row["student_accuracy_on_classes"] = _accuracy(student, images, union_labels, device)
        row["test_images"] = int(len(test))
        rows.append(row)
    return rows


def amalgamate(config: AmalgamateConfig | dict | None = None, *, resume: bool | str = False, overwrite: bool = False,
               progress: bool = True, command: str | None = None, say=lambda text: None, **fields) -> RunResult:
    """Amalgamate the zoo ``config.zoo`` into ``config.student``; see the module docstring.
    Arguments as for :func:`dfkd.distill`."""
    from teachers.device import resolve_device

    if resume:
        config, _ = resume_config(resume, AmalgamateConfig, fields)
    else:
        base = config.to_dict() if isinstance(config, AmalgamateConfig) else dict(config or {})
        config = AmalgamateConfig.from_layers(base, fields)
    cfg = config.validate()
    if not cfg.zoo:
        raise RunError("amalgamate needs --zoo zoo.yaml (a manifest written by dfkd zoo build)")
    if not cfg.out:
        raise RunError("amalgamate needs --out RUN_DIR")
    synthesizer_class(cfg.method)  # unknown method: error listing the known ones, before any work

    ensemble = TeacherEnsemble.from_zoo(cfg.zoo, combine=cfg.combine, combine_options=cfg.combine_options,
                                        class_map=cfg.class_map, allow_mixed=cfg.allow_mixed)
    if cfg.member_devices:  # a zoo too large for one device (dfkd.multi.placement)
        ensemble.place_members(parse_member_devices(cfg.member_devices))
        say("members on " + ", ".join(f"{n}: {d}" for n, d in zip(ensemble.names, ensemble.placed_devices())))
    if cfg.combine == "auto":  # config.yaml records what auto resolved to
        cfg = cfg.replace(combine=ensemble.combiner.name)
        say(f"combine auto -> {cfg.combine}: {ensemble.combine_reason}")
    synthesis, why = resolve_synthesis(cfg.synthesis, cfg.method, len(ensemble), cfg.synthesis_options)
    if synthesis != cfg.synthesis:
        cfg = cfg.replace(synthesis=synthesis)
        say(f"synthesis auto -> {synthesis}: {why}")
    meta = ensemble.meta()
    dataset = cfg.dataset or meta["dataset"]
    needs_data = cfg.method == "real" or not cfg.no_eval
    if needs_data and dataset not in list_datasets():
        raise RunError(f"the union data set {dataset!r} cannot be loaded; pass --dataset NAME"
                       + ("" if cfg.method == "real" else " or --no-eval"))
    if not cfg.no_eval and not cfg.eval_dataset:
        cfg = cfg.replace(eval_dataset=dataset)
    device = resolve_device(cfg.device)
    height = int(meta["image_shape"][1])

    if not cfg.no_eval:
        test = open_dataset(dataset, "test", root=cfg.data_root, download=cfg.download, classes=meta["classes"],
                            image_size=height)  # read a batch at a time
        meta["test_accuracy"] = _accuracy(ensemble.to(device), test, test.labels, device)
        say(f"ensemble of {len(ensemble)} teachers ({', '.join(ensemble.names)}), {ensemble.num_classes} classes, "
            f"combine {cfg.combine}: {100 * meta['test_accuracy']:.2f}% on {dataset} test")

    real_images = None
    if cfg.method == "real":
        real_images = open_dataset(dataset, "train", root=cfg.data_root, download=cfg.download,
                                   classes=meta["classes"], image_size=height)  # labels are never used
        if cfg.real_limit:
            keep = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.real_limit]
            real_images = torch.utils.data.Subset(real_images, keep.tolist())

    def make_synthesizer(name, teacher, **kwargs):
        if cfg.synthesis == "per-member":  # every member inverts itself (dfkd.multi.per_member)
            inner = PerMemberSynthesizer(name, teacher, settings=cfg.synthesis_options, **kwargs)
        else:
            inner = create_synthesizer(name, teacher, **kwargs)
        return AmalgamationSynthesizer(inner, teacher, combine=cfg.combine, combine_options=cfg.combine_options,
                                       features=cfg.features, layers=cfg.layers, feature_weight=cfg.feature_weight,
                                       feature_options=cfg.feature_options, student_loss=cfg.student_loss)

    def summary_extras(student, device) -> dict:
        extras = dict(zoo=str(cfg.zoo), combine=cfg.combine, combine_options=cfg.combine_options,
                      synthesis=cfg.synthesis, synthesis_options=cfg.synthesis_options,
                      features=cfg.features, layers=cfg.layers, ensemble_accuracy=meta["test_accuracy"],
                      union_classes=list(meta["classes"]))
        if not cfg.no_eval:
            extras["teachers"] = member_report(ensemble, student.eval(), cfg.data_root, device)
            if hasattr(ensemble.combiner, "calibration"):  # calibrated on the run's transfer images
                extras["ensemble_accuracy_calibrated"] = _accuracy(ensemble.eval(), test, test.labels, device)
        return extras

    return execute(cfg, ensemble, meta, resume=bool(resume), overwrite=overwrite, progress=progress,
                   make_synthesizer=make_synthesizer, summary_extras=summary_extras, real_images=real_images,
                   record={"zoo": str(cfg.zoo)}, command=command, say=say)
