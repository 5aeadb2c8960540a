"""``dfkd plot``: (re)draw a run's plots from its run directory (single teacher or zoo)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dfkd.api.runs import ANALYSIS_IMAGES
from dfkd.cli.common import CLIError, add_common, formatter
from dfkd.config import load_yaml
from dfkd.data import open_dataset
from dfkd.engine.evaluation import EvalData
from dfkd.engine.rundir import RunLock
from dfkd.reporting import plots
from dfkd.reporting.analysis import analyze_run
from teachers import freeze, load_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="(re)draw a run's plots", formatter_class=formatter)
    p.add_argument("kind", choices=["samples", "curves", "classes", "embedding", "confusion", "all"])
    p.add_argument("run_dir")
    p.add_argument("--embedding", default="pca", choices=["pca", "tsne"], help="2-D embedding method")
    add_common(p, config=False)
    p.set_defaults(func=run)


def run_teacher(cfg: dict):
    """The teacher of a run: its checkpoint, or the ensemble of its zoo (amalgamation runs)."""
    if cfg.get("zoo"):
        from dfkd.multi.ensemble import TeacherEnsemble

        ensemble = TeacherEnsemble.from_zoo(cfg["zoo"], combine=cfg.get("combine", "mean_prob"),
                                            combine_options=cfg.get("combine_options") or {},
                                            class_map=cfg.get("class_map"), allow_mixed=bool(cfg.get("allow_mixed")))
        return ensemble, ensemble.meta()
    if not cfg.get("teacher"):
        raise CLIError("the run's config.yaml names neither a teacher nor a zoo")
    return load_checkpoint(cfg["teacher"])


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CLIError(f"{run_dir} is not a dfkd run directory (no config.yaml)")
    with RunLock(run_dir):  # never draw into a directory a run is writing
        return _plot(args, run_dir)


def _plot(args, run_dir: Path) -> int:
    if args.kind == "curves":
        if not (run_dir / "metrics.csv").exists():
            raise CLIError(f"{run_dir} has no metrics.csv (was the run evaluated?)")
        print(plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png"))
        return 0
    cfg = load_yaml(run_dir / "config.yaml")
    if not (run_dir / "samples.pt").exists():
        raise CLIError(f"{run_dir} has no samples.pt (the run did not finish; dfkd distill --resume {run_dir})")
    samples = torch.load(run_dir / "samples.pt", map_location="cpu", weights_only=True)
    teacher, meta = run_teacher(cfg)
    student, _ = load_checkpoint(run_dir / "student.pt")
    teacher, student = freeze(teacher), student.eval()
    real_images = real_labels = None
    if args.kind in ("embedding", "confusion", "all", "samples"):
        try:  # the images a run's own plots read: the first ANALYSIS_IMAGES of the test split, a batch at a time
            split = open_dataset(cfg.get("eval_dataset") or meta["dataset"], "test", root=cfg.get("data_root"),
                                 classes=meta["classes"], image_size=meta["image_shape"][1])
            real_images, real_labels = EvalData.from_dataset(split).head(ANALYSIS_IMAGES)
        except Exception as exc:
            if args.kind in ("embedding", "confusion"):
                raise
            print(f"note: real images not shown ({exc})", file=sys.stderr)
    result = analyze_run(run_dir, teacher, student, samples, real_images, real_labels, list(meta["class_names"]),
                         embedding=args.embedding)
    for name in result.get("plots", []):
        if args.kind == "all" or name.startswith(args.kind):
            print(run_dir / name)
    return 0
