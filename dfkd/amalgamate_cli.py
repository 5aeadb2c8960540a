"""``dfkd amalgamate``: distill a whole teacher zoo into one student over the union of classes.

::

    dfkd amalgamate --zoo zoo.yaml --student lenet5_half --method deepinversion \\
        --combine entropy_weighted [--combine-opt tau=0.5] \\
        [--features cfl --layers relu3:digits_a.relu3,relu3:digits_b.relu3] \\
        --steps 1000 --out runs/amal

The zoo's teachers become a :class:`dfkd.ensemble.TeacherEnsemble` that drives the chosen
synthesizer (``--method real`` samples real unlabeled training images of ``--dataset``
instead: the upper bound); the student's loss is the combiner's (KD against the merged
target, or ``--combine uhc``) plus the feature-amalgamation terms. The run directory is the
one ``dfkd distill`` writes, and ``summary.json`` also holds ``ensemble_accuracy`` and
``teachers``: each member's accuracy on its own classes of the test split, with the
student's accuracy on the same images (``student_accuracy_on_classes``).
"""
from __future__ import annotations

from pathlib import Path

from dfkd.cli import DISTILL_DEFAULTS, METHOD_FLAGS, CLIError, _print_summary, _say, add_run_arguments, resume_config, run_distillation

AMALGAMATE_DEFAULTS = {
    **DISTILL_DEFAULTS,
    "zoo": None,
    "combine": "mean_prob",
    "combine_options": {},
    "features": None,
    "layers": None,
    "feature_weight": 1.0,
    "feature_options": {},
    "student_loss": "combiner",
    "dataset": None,
    "allow_mixed": False,
    "class_map": None,
    "real_limit": 0,
}
_OWN_FLAGS = ("zoo", "combine", "features", "layers", "feature_weight", "student_loss", "dataset", "allow_mixed",
              "real_limit")


def add_amalgamate_parser(sub, common, formatter) -> None:
    """Add the ``amalgamate`` subcommand to the ``dfkd`` parser."""
    p = sub.add_parser("amalgamate", help="distill a teacher zoo (ensemble / knowledge amalgamation) into one student",
                       formatter_class=formatter,
                       description="Distill a whole teacher zoo into one student over the union of its classes: the "
                                   "teachers become one ensemble that drives the synthesizer; the student learns the "
                                   "merged logits (--combine) and optionally their features (--features, --layers). "
                                   "Writes the run directory of dfkd distill, with per-teacher accuracy in summary.json.")
    p.add_argument("--zoo", help="zoo manifest (zoo.yaml, see dfkd zoo build)")
    p.add_argument("--student", help="student architecture (default lenet5_half)")
    p.add_argument("--method", help="dafl, deepinversion, zskt, dfad, fast, real (default dafl)")
    p.add_argument("--combine", help="logit combiner: mean_prob, mean_logits, weighted, entropy_weighted, least_ambiguous, "
                                     "noisy, pate, concat, uhc (dfkd.combine.list_combiners(); default mean_prob)")
    p.add_argument("--combine-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="combiner option, repeatable (e.g. tau=0.5, weights=[1,2], sigma=0.1, epsilon=1)")
    p.add_argument("--features", help="feature amalgamation: cfl, layerwise_ae, hint or attention (default: none)")
    p.add_argument("--layers", help="layer pairs student_path:member.path,... (default: last blocks)")
    p.add_argument("--feature-weight", type=float, help="weight of the feature terms (default 1)")
    p.add_argument("--student-loss", choices=["combiner", "method"],
                   help="combiner: KD/UHC against the merged target; method: the method's own loss (default combiner)")
    p.add_argument("--dataset", help="data set of the real images (--method real) and of evaluation (default: the zoo's)")
    p.add_argument("--real-limit", type=int, help="--method real: use at most this many training images (default 0: all)")
    p.add_argument("--allow-mixed", action="store_true", help="merge teachers of different data sets/image shapes")
    add_run_arguments(p)
    common(p)
    p.set_defaults(func=cmd_amalgamate)


# ----------------------------------------------------------------------------- config
def amalgamate_config(args) -> dict:
    """Defaults < --config file < flags < key=value overrides."""
    from dfkd.config import ConfigError, load_yaml, merge_config, parse_overrides, parse_value

    file_cfg = load_yaml(args.config) if getattr(args, "config", None) else {}
    keys = [k for k in DISTILL_DEFAULTS if k not in ("options", "teacher")] + list(_OWN_FLAGS)
    flags = {k: getattr(args, k) for k in keys if getattr(args, k, None) not in (None, False)}
    flags["options"] = {key: getattr(args, flag) for flag, (key, _, _) in METHOD_FLAGS.items()
                        if getattr(args, flag, None) not in (None, False)}
    combine_options = {}
    for item in getattr(args, "combine_opt", None) or []:
        if "=" not in item:
            raise ConfigError(f"--combine-opt {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        combine_options[key.strip()] = parse_value(text)
    if combine_options:
        flags["combine_options"] = combine_options
    cfg = merge_config(AMALGAMATE_DEFAULTS, file_cfg, flags, parse_overrides(getattr(args, "overrides", [])))
    if combine_options:  # flags win over the file, key by key
        cfg["combine_options"] = {**(file_cfg.get("combine_options") or {}), **combine_options}
    return cfg


# ----------------------------------------------------------------------------- evaluation helpers
def _accuracy(model, images, labels, device) -> float:
    from dfkd.engine import match_rate, predict

    return match_rate(predict(model, images, device), labels)


def member_report(ensemble, student, cfg, device) -> list[dict]:
    """Each member on its own classes of its test split, and the student on those images."""
    from dfkd.data import load_dataset

    rows = []
    for i, (name, member, meta) in enumerate(zip(ensemble.names, ensemble.members, ensemble.metas)):
        dataset = meta.get("dataset")
        row = {"name": name, "arch": getattr(member, "arch", None), "dataset": dataset,
               "classes": list(meta["classes"]), "union_index": ensemble.index(i).tolist()}
        try:
            test = load_dataset(dataset, "test", root=cfg["data_root"], classes=list(meta["classes"]),
                                image_size=int(meta["image_shape"][1]))
        except Exception as exc:  # a member whose data set is not available here
            row["error"] = str(exc)
            rows.append(row)
            continue
        row["accuracy"] = _accuracy(member, test.images, test.labels, device)
        if student is not None:
            union_labels = ensemble.index(i).cpu()[test.labels]
            images = test.images
            if tuple(images.shape[1:]) != tuple(ensemble.image_shape):
                from dfkd.ensemble import adapt_input

                images = adapt_input(images, ensemble.image_shape)
            row["student_accuracy_on_classes"] = _accuracy(student, images, union_labels, device)
        row["test_images"] = int(len(test))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the command
def cmd_amalgamate(args) -> int:
    import torch

    from dfkd.amalgamation import AmalgamationSynthesizer
    from dfkd.data import list_datasets, load_dataset
    from dfkd.engine import atomic_json, resolve_device
    from dfkd.ensemble import TeacherEnsemble
    import generators
    from teachers import load_checkpoint

    resume = False
    if getattr(args, "resume", None):
        cfg, resume = resume_config(args.resume, AMALGAMATE_DEFAULTS)
    else:
        cfg = amalgamate_config(args)
    if not cfg["zoo"]:
        raise CLIError("amalgamate needs --zoo zoo.yaml (a manifest written by dfkd zoo build)")
    if not cfg["out"]:
        raise CLIError("amalgamate needs --out RUN_DIR")
    generators.synthesizer_class(cfg["method"])  # unknown method: error listing the known ones, before any work

    ensemble = TeacherEnsemble.from_zoo(cfg["zoo"], combine=cfg["combine"], combine_options=cfg["combine_options"],
                                        class_map=cfg["class_map"], allow_mixed=cfg["allow_mixed"])
    meta = ensemble.meta()
    dataset = cfg["dataset"] or meta["dataset"]
    needs_data = cfg["method"] == "real" or not cfg["no_eval"]
    if needs_data and dataset not in list_datasets():
        raise CLIError(f"the union data set {dataset!r} cannot be loaded; pass --dataset NAME"
                       + ("" if cfg["method"] == "real" else " or --no-eval"))
    cfg["eval_dataset"] = cfg["eval_dataset"] or (dataset if not cfg["no_eval"] else None)
    cfg["teacher"] = str(cfg["zoo"])
    device = resolve_device(cfg["device"])
    height = int(meta["image_shape"][1])

    if not cfg["no_eval"]:
        test = load_dataset(dataset, "test", root=cfg["data_root"], download=cfg["download"], classes=meta["classes"],
                            image_size=height)
        meta["test_accuracy"] = _accuracy(ensemble.to(device), test.images, test.labels, device)
        _say(args, f"ensemble of {len(ensemble)} teachers ({', '.join(ensemble.names)}), {ensemble.num_classes} classes, "
                   f"combine {cfg['combine']}: {100 * meta['test_accuracy']:.2f}% on {dataset} test")

    real_images = None
    if cfg["method"] == "real":
        train = load_dataset(dataset, "train", root=cfg["data_root"], download=cfg["download"], classes=meta["classes"],
                             image_size=height)
        real_images = train.images  # labels are never used
        if cfg["real_limit"]:
            keep = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(cfg["seed"]))[: cfg["real_limit"]]
            real_images = real_images[keep]

    create = generators.create_synthesizer

    def factory(name, teacher, **kwargs):
        if name == "real":
            kwargs["images"] = real_images
        inner = create(name, teacher, **kwargs)
        return AmalgamationSynthesizer(inner, teacher, combine=cfg["combine"], combine_options=cfg["combine_options"],
                                       features=cfg["features"], layers=cfg["layers"],
                                       feature_weight=cfg["feature_weight"], feature_options=cfg["feature_options"],
                                       student_loss=cfg["student_loss"])

    summary = run_distillation(cfg, args, resume=resume, teacher_override=(ensemble, meta), synthesizer_factory=factory)

    out = Path(cfg["out"])
    summary.update(zoo=str(cfg["zoo"]), combine=cfg["combine"], combine_options=cfg["combine_options"],
                   features=cfg["features"], layers=cfg["layers"], ensemble_accuracy=meta["test_accuracy"],
                   union_classes=list(meta["classes"]))
    if not cfg["no_eval"]:
        student, _ = load_checkpoint(out / "student.pt", map_location=device)
        summary["teachers"] = member_report(ensemble, student.eval(), cfg, device)
    atomic_json(out / "summary.json", summary)
    _print_summary(summary, out)
    for row in summary.get("teachers", []):
        if "accuracy" in row:
            print(f"  teacher {row['name']}: {100 * row['accuracy']:.2f}% on its {len(row['classes'])} classes; "
                  f"student {100 * row['student_accuracy_on_classes']:.2f}% on the same images")
    return 0
