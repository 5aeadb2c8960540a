"""``dfkd train-teacher``, ``dfkd evaluate`` and ``dfkd import-weights``: the teacher side."""
from __future__ import annotations

from pathlib import Path

from dfkd.api import TeacherConfig, train_teacher
from dfkd.api.teacher import dataset_meta
from dfkd.cli.common import add_common, formatter, given, sayer
from dfkd.config import load_yaml, parse_overrides
from teachers.files import write_json

_DEFAULTS = TeacherConfig.defaults()


def add_parsers(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a teacher with labels on a real data set", formatter_class=formatter)
    p.add_argument("--dataset", help=f"data set (default {_DEFAULTS['dataset']}); see dfkd.data.list_datasets()")
    p.add_argument("--arch", help=f"architecture (default {_DEFAULTS['arch']}); tv:<name> for torchvision models")
    p.add_argument("--classes", help="train on a subset of classes, e.g. 0-4 or 0,2,5 (default: all)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {_DEFAULTS['batch_size']})")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="optimizer (default: the architecture's recipe)")
    p.add_argument("--lr", type=float, help="learning rate (default: the architecture's recipe)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the architecture's recipe)")
    p.add_argument("--augment", choices=["crop", "crop_flip", "none"], help="augmentation (default crop)")
    p.add_argument("--schedule", choices=["cosine", "constant"], help="learning rate schedule (default cosine)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", default=None, help="download the data set through torchvision if missing")
    p.add_argument("--image-size", type=int, help="resize images to this side (default: the data set's)")
    p.add_argument("--record-metadata", action="store_true", default=None,
                   help="also record per-class activation statistics of the training data (needed by --method lopes)")
    p.add_argument("--out", help="where to write the checkpoint (.pt)")
    add_common(p)
    p.set_defaults(func=run_train_teacher)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a real test split", formatter_class=formatter)
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    p.add_argument("--dataset", help="data set (default: the checkpoint's)")
    p.add_argument("--data-root", help="directory with the data set's files")
    p.add_argument("--download", action="store_true", help="download the data set if missing")
    p.add_argument("--device", default="auto", help="device")
    p.add_argument("--json", help="also write the result as JSON here")
    add_common(p, config=False)
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("import-weights", help="turn a plain state_dict file into a dfkd checkpoint", formatter_class=formatter)
    p.add_argument("src", help="plain state_dict file (.pt/.pth), loaded with weights_only=True")
    p.add_argument("--arch", required=True, help="architecture the weights belong to")
    p.add_argument("--dataset", required=True, help="data set the model was trained on")
    p.add_argument("--classes", help="the class subset it was trained on (default: all)")
    p.add_argument("--image-size", type=int, help="input size (default: the data set's)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    add_common(p, config=False)
    p.set_defaults(func=run_import)


def teacher_config(args) -> TeacherConfig:
    """Defaults < --config file < flags < key=value overrides (explicit zeros are kept)."""
    layers = [load_yaml(args.config) if args.config else {}, given(args, _DEFAULTS), parse_overrides(args.overrides)]
    return TeacherConfig.from_layers(*layers)


def run_train_teacher(args) -> int:
    result = train_teacher(teacher_config(args), progress=not args.quiet, say=sayer(args))
    print(f"test accuracy {result.test_accuracy:.4f} ({result.dataset}, {result.test_images} test images) "
          f"in {result.seconds:.1f}s -> {result.path}")
    return 0


def run_evaluate(args) -> int:
    from dfkd.data import open_dataset
    from dfkd.engine.evaluation import model_logits
    from teachers import load_checkpoint
    from teachers.device import resolve_device
    from teachers.training import classification_report

    model, meta = load_checkpoint(args.model)
    device = resolve_device(args.device)
    dataset = args.dataset or meta["dataset"]
    test = open_dataset(dataset, "test", root=args.data_root, download=args.download, classes=meta["classes"],
                        image_size=meta["image_shape"][1])  # read a batch at a time
    result = classification_report(model_logits(model.to(device), test, device), test.labels)
    print(f"{args.model}: {meta.get('arch', '')} accuracy {100 * result['accuracy']:.2f}% on {dataset} test ({len(test)} images)")
    for name, acc in zip(test.info.class_names, result["per_class_accuracy"]):
        print(f"  {name:>14s}: {'n/a' if acc is None else f'{100 * acc:.2f}%'}")
    if args.json:
        write_json(Path(args.json), {k: v for k, v in result.items() if k != "predictions"})
    return 0


def run_import(args) -> int:
    from dfkd.data import dataset_info, parse_classes
    from teachers import import_state_dict

    info = dataset_info(args.dataset, classes=parse_classes(args.classes), image_size=args.image_size)
    meta = dataset_meta(info)
    meta.update(test_accuracy=None, seed=None, imported_from=str(args.src))
    arch_kwargs = {"num_classes": info.num_classes, "in_channels": info.image_shape[0], "image_size": info.image_shape[1]}
    path = import_state_dict(args.src, args.out, args.arch, arch_kwargs, meta)
    print(f"imported {args.src} as {args.arch} for {info.name} -> {path} (run dfkd evaluate --model {path} to measure it)")
    return 0
