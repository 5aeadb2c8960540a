"""``dfkd.synthesize``: a distillation run's synthetic images written out as a transfer set.

A run's synthesizer (its trained generator, or its bank of inverted images) is what the
method learned about the teacher's data. :func:`synthesize` rebuilds it from the run's
``config.yaml`` and saved state and writes ``images`` of its images as uint8 ``.npy`` shards
(:func:`dfkd.data.folder.write_shard`), one shard set per rank of the run (``rank0/``,
``rank1/`` ... for a run made by several processes, each with its share of the images), and a
``manifest.json``: the teacher and its sha256, the method, the run's resolved config, the
images per class (by the teacher's prediction) and the images' per-channel mean and std.
``dfkd distill --method real --transfer-set DIR`` (or any tool that reads ``.npy`` arrays)
trains from the folder.

Images come from the synthesizer's ``preview``: fresh generator samples for generator methods
(DAFL, ZSKT, DFAD), draws from the bank for bank methods (DeepInversion, Fast, CMI, ZSKD,
KegNet), so a set larger than the bank repeats images. Runs of a teacher zoo
(``dfkd amalgamate``) are not exported yet.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from dfkd.api.results import RunError
from dfkd.api.runs import load_bn_priors
from dfkd.config import load_yaml
from dfkd.data.folder import read_manifest, write_manifest, write_shard
from dfkd.engine import rundir
from generators import create_synthesizer, synthesizer_class
from teachers import freeze, is_pretrained_spec, load_teacher
from teachers.device import batched_logits, resolve_device, seed_everything
from teachers.files import sha256_file


def _run_state(run_dir: Path) -> list[dict]:
    """Every rank's synthesizer state of the run (one for a single-process run)."""
    path = run_dir / rundir.STATE
    if not path.is_file():
        raise RunError(f"{run_dir} has no state.pt: the run saved no synthesizer yet; finish or resume it first")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign
        raise RunError(f"{path}: not a readable run state ({type(exc).__name__}); resume the run to rewrite it") from None
    if not isinstance(state, dict) or "synthesizer" not in state:
        raise RunError(f"{path} is not a dfkd run state")
    return [r["synthesizer"] for r in state["rank_states"]] if state.get("rank_states") else [state["synthesizer"]]


def method_state(state: dict, cfg: dict) -> dict:
    """The method's own synthesizer state inside the wrappers a run put around it: deep mutual
    learning's peers (outermost) and forms of knowledge (:func:`dfkd.api.runs.execute`'s order)."""
    for wrapped in (int(cfg.get("peers") or 1) > 1, bool(cfg.get("knowledge"))):
        if wrapped:
            state = state["inner"]
    return state


def synthesize(run_dir, out, images: int = 10_000, shard_size: int = 4096, device: str = "auto",
               overwrite: bool = False) -> dict:
    """Write ``images`` synthetic images of the run in ``run_dir`` to the folder ``out``
    (module docstring); returns the manifest."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / rundir.CONFIG).is_file():
        raise RunError(f"{run_dir} is not a dfkd run directory (no config.yaml)")
    if images <= 0 or shard_size <= 0:
        raise RunError(f"--images and --shard-size must be positive, got {images} and {shard_size}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a transfer set" if read_manifest(out) is not None else "files"
        raise RunError(f"{out} already holds {what}; choose another --out or pass --overwrite")
    cfg = load_yaml(run_dir / rundir.CONFIG)
    if cfg.get("zoo"):
        raise RunError(f"{run_dir} amalgamated a teacher zoo; exporting a zoo run's images is not supported yet")
    if cfg.get("method") == "real":
        raise RunError(f"{run_dir} distilled from real images; it has no synthetic images to write")
    teacher_path = cfg.get("teacher")
    if not teacher_path or not (is_pretrained_spec(teacher_path) or Path(teacher_path).is_file()):
        raise RunError(f"the run's teacher {teacher_path!r} is not at hand; run from the directory the run was made in")
    ranks = _run_state(run_dir)

    device = resolve_device(device)
    teacher, meta = load_teacher(teacher_path, map_location="cpu")
    teacher = freeze(teacher.to(device))
    seed_everything(int(cfg.get("seed", 0)))
    bn_priors, _ = load_bn_priors(cfg.get("bn_priors"), meta, device)
    from_meta = {arg: meta.get(key) for arg, key in synthesizer_class(cfg["method"]).teacher_meta_arguments.items()}
    synth = create_synthesizer(cfg["method"], teacher, image_shape=meta["image_shape"], num_classes=len(meta["classes"]),
                               device=device, seed=int(cfg.get("seed", 0)), precision=cfg.get("precision", "auto"),
                               **({"bn_priors": bn_priors} if bn_priors else {}), **from_meta, **cfg["options"])

    counts = torch.zeros(len(meta["classes"]), dtype=torch.long)
    sums = torch.zeros(meta["image_shape"][0], dtype=torch.float64)
    squares = torch.zeros_like(sums)
    shards, share = [], -(-images // len(ranks))
    for rank, state in enumerate(ranks):
        synth.load_state_dict(method_state(state, cfg))
        left = min(share, images - rank * share)
        for k in range(math.ceil(left / shard_size)):
            with torch.no_grad():
                batch = synth.preview(min(shard_size, left - k * shard_size)).float().clamp(0, 1).cpu()
            name = f"rank{rank}/shard-{k:05d}.npy" if len(ranks) > 1 else f"shard-{k:05d}.npy"
            write_shard(out / name, batch)
            shards.append({"file": name, "images": int(batch.shape[0])})
            counts += torch.bincount(batched_logits(teacher, batch, device).argmax(1), minlength=len(counts))
            sums += batch.double().sum((0, 2, 3))
            squares += batch.double().square().sum((0, 2, 3))
    pixels = images * meta["image_shape"][1] * meta["image_shape"][2]
    mean = sums / pixels
    manifest = {
        "format": "dfkd-transfer-set/1",
        "made_by": "dfkd synthesize",
        "run": str(run_dir),
        "teacher": str(teacher_path),
        "teacher_sha256": None if is_pretrained_spec(teacher_path) else sha256_file(teacher_path),
        "method": cfg["method"],
        "config": cfg,
        "world_size": len(ranks),
        "images": images,
        "image_shape": list(meta["image_shape"]),
        "class_names": list(meta["class_names"]),
        "images_per_class": {name: int(n) for name, n in zip(meta["class_names"], counts.tolist())},
        "pixel_mean": [round(v, 6) for v in mean.tolist()],
        "pixel_std": [round(v, 6) for v in (squares / pixels - mean.square()).clamp_min(0).sqrt().tolist()],
        "shards": shards,
    }
    write_manifest(out, manifest)
    return manifest
