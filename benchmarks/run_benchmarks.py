"""Fashion-MNIST results table: every row trained with the package's own commands.

Usage (from the repository root, after ``bash scripts/setup.sh``)::

    .venv/bin/python benchmarks/run_benchmarks.py                      # every row, seeds 0 1 2
    .venv/bin/python benchmarks/run_benchmarks.py --rows best dafl --seeds 0
    .venv/bin/python benchmarks/run_benchmarks.py --report-only        # rebuild RESULTS.md from JSON

Each run is one ``dfkd`` subprocess (one CPU thread each, ``--jobs`` of them at a time);
its summary plus wall time and peak resident memory go to
``benchmarks/results/<row>/seed<k>.json``; ``benchmarks/RESULTS.md`` is rebuilt from all JSON
files. Nothing here is a test: the numbers are measured, never asserted.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"


def rel(path) -> str:
    """``path`` relative to the repository root when it lies inside it (commands run from the
    root, and run records must not name the machine's directories), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def at_root(path) -> Path:
    """A path from a command line, relative to the repository root unless absolute."""
    return ROOT / Path(path)

# Teacher checkpoints are kept in git (benchmarks/teachers/, about 1 MB in all): a fresh
# machine retrains them with the same command, but not bit for bit (the first lenet5_bn
# teacher reached 90.67%, its retrained copies 90.80-90.82%), so every run records which
# teacher files it used (teacher_fingerprints) and the report lists them.
TEACHERS = ROOT / "benchmarks" / "teachers"
TEACHER = TEACHERS / "fm_lenet5_bn_seed0.pt"
TEACHER_PLAIN = TEACHERS / "fm_lenet5_seed0.pt"
# Further zoo members for the best-zoo row, whose BatchNorm statistics are priors (--bn-prior).
TEACHER_RESNET8 = TEACHERS / "fm_resnet8_seed0.pt"
TEACHER_SEED1 = TEACHERS / "fm_lenet5_bn_seed1.pt"
TEACHER_HALF_BN = TEACHERS / "fm_lenet5_half_bn_seed0.pt"
TEACHER_DAFL_OFFICIAL = TEACHERS / "fm_lenet5_dafl_official_seed0.pt"
TEACHER_RECORDS = TEACHERS / "fm_lenet5_bn_records_seed0.pt"  # the teacher row's recipe + activation records
# DAFL's official teacher recipe with one change each (what makes a teacher invertible: docs/experiments.md)
TEACHER_OFFICIAL_AUG = TEACHERS / "fm_lenet5_official_crop_seed0.pt"
TEACHER_OFFICIAL_LONG = TEACHERS / "fm_lenet5_official_15ep_seed0.pt"
# The teacher checkpoints kept in git: row -> (checkpoint, the seed of the row's command that made it).
KEPT_TEACHERS = {"teacher": (TEACHER, 0), "teacher-plain": (TEACHER_PLAIN, 0), "teacher-seed1": (TEACHER_SEED1, 1),
                 "teacher-resnet8": (TEACHER_RESNET8, 0), "teacher-half-bn": (TEACHER_HALF_BN, 0),
                 "teacher-dafl-official": (TEACHER_DAFL_OFFICIAL, 0), "teacher-records": (TEACHER_RECORDS, 0),
                 "teacher-official-aug": (TEACHER_OFFICIAL_AUG, 0), "teacher-official-long": (TEACHER_OFFICIAL_LONG, 0)}
#: the placeholders of row commands that name a kept teacher ({teacher_plain} is row teacher-plain's file)
TEACHER_PLACEHOLDERS = {"teacher": "teacher", "teacher_plain": "teacher-plain",
                        "teacher_dafl_official": "teacher-dafl-official", "teacher_records": "teacher-records",
                        "teacher_official_aug": "teacher-official-aug", "teacher_official_long": "teacher-official-long"}
# zoo row -> the kept teachers whose BN statistics are its priors
ZOO_PRIORS = {"best-zoo": ["teacher-resnet8", "teacher-seed1"],
              "best-zoo3": ["teacher-resnet8", "teacher-seed1", "teacher-half-bn"]}
ZOO_TEACHERS = TEACHERS / "zoo"
ZOO_DIR = RUNS / "zoo"

# Teacher zoos of the amalgamation scenarios: member name -> dfkd train-teacher arguments
# (seed 0). Scenario (a): two teachers on disjoint halves; (b): three teachers of three
# architectures whose class sets overlap (a's two plus a LeNet-5-half-BN on classes 2-7).
ZOO_MEMBERS = {
    "lenet5_bn_0-4": "--arch lenet5_bn --classes 0-4 --epochs 15",
    "resnet8_5-9": "--arch resnet8 --classes 5-9 --epochs 10",
    "lenet5_half_bn_2-7": "--arch lenet5_half_bn --classes 2-7 --epochs 9",
}
ZOOS = {"a": ["lenet5_bn_0-4", "resnet8_5-9"], "b": ["lenet5_bn_0-4", "resnet8_5-9", "lenet5_half_bn_2-7"]}

# Published numbers quoted beside ours (final column of the table).
PUBLISHED = {
    "teacher": "90.84 (ZSKD, Nayak et al. ICML 2019, LeNet-5)",
    "kd-real": "89.66 (ZSKD: KD with all real data)",
    "best": "79.62 (ZSKD, best published data-free on Fashion-MNIST)",
    "dafl": "MNIST: 98.20 (DAFL paper); no Fashion-MNIST number",
    "dfad": "MNIST: 98.3 (DFAD paper); no Fashion-MNIST number",
    "zskd": "79.62 (ZSKD paper: LeNet-5 90.84% -> LeNet-5-Half, 48,000 DIs)",
    "zskd-paper": "79.62 (ZSKD paper, this setting unscaled)",
    "cmi": "CIFAR-10 only (CMI paper); target: fast's row",
    "dfnd": "CIFAR/ImageNet only (DFND paper); wild data here: digits",
    "lopes": "MNIST only (Lopes et al. 2017, fully connected teachers)",
    "mosaickd": "CIFAR/ImageNet only (MosaicKD paper); wild data here: digits",
    "kegnet": "Fashion-MNIST only for Tucker-compressed copies of the teacher (KegNet paper), not a new student",
}
PUBLISHED["lopes-all"] = PUBLISHED["lopes"]

# row -> (description, dfkd arguments without --seed/--out). {teacher} is filled in.
DISTILL = "distill --teacher {teacher} --student lenet5_half --quiet"
AMALGAMATE = ("amalgamate --zoo {{zoo_dir}}/zoo_{zoo}.yaml --student lenet5_half --quiet"
              " --config configs/fashion-mnist/amalgamate-{recipe}.yaml")
BEST_RECIPE = DISTILL + " --config configs/fashion-mnist/best.yaml"
LOPES_RECIPE = DISTILL.replace("{teacher}", "{teacher_records}") + " --config configs/fashion-mnist/lopes.yaml"


def bn_prior_flags(row: str) -> str:
    """`` --bn-prior CHECKPOINT`` for each kept teacher that is a BN prior of ``row``."""
    return "".join(f" --bn-prior {rel(KEPT_TEACHERS[prior][0])}" for prior in ZOO_PRIORS[row])


ROWS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher lenet5_bn, labels, real data (15 epochs)",
                "train-teacher --dataset fashion-mnist --arch lenet5_bn --epochs 15 --quiet"),
    "teacher-plain": ("teacher lenet5 (no BN), labels, real data (15 epochs)",
                      "train-teacher --dataset fashion-mnist --arch lenet5 --epochs 15 --quiet"),
    "teacher-seed1": ("zoo member: a second lenet5_bn (seed 1; a BN prior of best-zoo), labels, real data (15 epochs)",
                      "train-teacher --dataset fashion-mnist --arch lenet5_bn --epochs 15 --quiet"),
    "teacher-resnet8": ("zoo member: resnet8 (a BN prior of best-zoo), labels, real data (5 epochs)",
                        "train-teacher --dataset fashion-mnist --arch resnet8 --epochs 5 --quiet"),
    "teacher-half-bn": ("zoo member: lenet5_half_bn (a BN prior of best-zoo3), labels, real data (15 epochs)",
                        "train-teacher --dataset fashion-mnist --arch lenet5_half_bn --epochs 15 --quiet"),
    "teacher-dafl-official": ("teacher lenet5 trained as DAFL's teacher-train.py: Adam lr 1e-3 constant, batch 256, "
                              "no augmentation, 3 epochs",
                              "train-teacher --dataset fashion-mnist --arch lenet5 --epochs 3 --optimizer adam --lr 0.001"
                              " --schedule constant --batch-size 256 --augment none --quiet"),
    "teacher-official-aug": ("teacher lenet5 as teacher-dafl-official, with random crops (its one change)",
                             "train-teacher --dataset fashion-mnist --arch lenet5 --epochs 3 --optimizer adam --lr 0.001"
                             " --schedule constant --batch-size 256 --augment crop --quiet"),
    "teacher-official-long": ("teacher lenet5 as teacher-dafl-official, 15 epochs instead of 3 (its one change)",
                              "train-teacher --dataset fashion-mnist --arch lenet5 --epochs 15 --optimizer adam --lr 0.001"
                              " --schedule constant --batch-size 256 --augment none --quiet"),
    "teacher-records": ("teacher lenet5_bn as the teacher row, with activation records for Lopes et al. (--record-metadata)",
                        "train-teacher --dataset fashion-mnist --arch lenet5_bn --epochs 15 --record-metadata --quiet"),
    "student-labels": ("student lenet5_half, labels, real data (15 epochs)",
                       "train-teacher --dataset fashion-mnist --arch lenet5_half --epochs 15 --quiet"),
    "kd-real": ("KD with all real train images (upper bound)",
                DISTILL + " --config configs/fashion-mnist/kd-real.yaml"),
    "dafl": ("DAFL (CPU budget recipe, generator lr 0.002 for Fashion-MNIST)", DISTILL + " --config configs/fashion-mnist/bench-dafl.yaml"),
    "dafl-plain": ("DAFL, teacher lenet5 (no BN)", DISTILL.replace("{teacher}", "{teacher_plain}")
                   + " --config configs/fashion-mnist/bench-dafl.yaml"),
    "dafl-official-teacher": ("DAFL (the dafl row's recipe), teacher trained as DAFL's teacher-train.py",
                              DISTILL.replace("{teacher}", "{teacher_dafl_official}")
                              + " --config configs/fashion-mnist/bench-dafl.yaml"),
    "dafl-official-aug": ("DAFL (the dafl row's recipe), teacher teacher-official-aug",
                          DISTILL.replace("{teacher}", "{teacher_official_aug}") + " --config configs/fashion-mnist/bench-dafl.yaml"),
    "dafl-official-long": ("DAFL (the dafl row's recipe), teacher teacher-official-long",
                           DISTILL.replace("{teacher}", "{teacher_official_long}") + " --config configs/fashion-mnist/bench-dafl.yaml"),
    "deepinversion": ("DeepInversion (CPU budget recipe)", DISTILL + " --config configs/fashion-mnist/bench-deepinversion.yaml"),
    "deepinversion-adi": ("DeepInversion + ADI (CPU budget recipe)",
                          DISTILL + " --config configs/fashion-mnist/bench-deepinversion-adi.yaml"),
    "deepinversion-adi-tv": ("DeepInversion + ADI + TV-l2 2e-2 + mixup into a pool of inverted batches",
                             DISTILL + " --config configs/fashion-mnist/bench-deepinversion-adi-tv.yaml"),
    "zskt": ("ZSKT (CPU budget recipe)", DISTILL + " --config configs/fashion-mnist/bench-zskt.yaml"),
    "zskt-plain": ("ZSKT, teacher lenet5 (no BN)", DISTILL.replace("{teacher}", "{teacher_plain}")
                   + " --config configs/fashion-mnist/bench-zskt.yaml"),
    "zskt-official-teacher": ("ZSKT, teacher trained as DAFL's teacher-train.py",
                              DISTILL.replace("{teacher}", "{teacher_dafl_official}") + " --config configs/fashion-mnist/bench-zskt.yaml"),
    "dfad": ("DFAD (CPU budget recipe)", DISTILL + " --config configs/fashion-mnist/bench-dfad.yaml"),
    "dfad-plain": ("DFAD, teacher lenet5 (no BN)", DISTILL.replace("{teacher}", "{teacher_plain}")
                   + " --config configs/fashion-mnist/bench-dfad.yaml"),
    "fast": ("Fast (CPU budget recipe)", DISTILL + " --config configs/fashion-mnist/bench-fast.yaml"),
    "best": ("best data-free recipe (configs/fashion-mnist/best.yaml)", BEST_RECIPE),
    "best-zoo": ("best recipe + BN-statistics priors (--bn-prior) resnet8 and lenet5_bn seed 1; KD from the teacher alone",
                 BEST_RECIPE + bn_prior_flags("best-zoo")),
    "best-zoo3": ("best-zoo + a third BN prior, lenet5_half_bn (the student's architecture with BN)",
                  BEST_RECIPE + bn_prior_flags("best-zoo3")),
    "amal-a": ("amalgamation (a): lenet5_bn 0-4 + resnet8 5-9, data-free (Fast), concat",
               AMALGAMATE.format(zoo="a", recipe="fast") + " --combine concat --synthesis shared"),
    "amal-a-real": ("amalgamation (a) on real unlabeled images, concat",
                    AMALGAMATE.format(zoo="a", recipe="real") + " --combine concat --dataset fashion-mnist"),
    "amal-b": ("amalgamation (b): + lenet5_half_bn 2-7 (overlapping), data-free (Fast), uhc",
               AMALGAMATE.format(zoo="b", recipe="fast") + " --combine uhc --synthesis shared"),
    "amal-b-real": ("amalgamation (b) on real unlabeled images, uhc",
                    AMALGAMATE.format(zoo="b", recipe="real") + " --combine uhc --dataset fashion-mnist"),
    "amal-a-cal": ("amalgamation (a), data-free (Fast, one synthesizer for the zoo), calibrated_concat",
                   AMALGAMATE.format(zoo="a", recipe="fast") + " --combine calibrated_concat --synthesis shared"),
    "amal-a-cal-real": ("amalgamation (a) on real unlabeled images, calibrated_concat",
                        AMALGAMATE.format(zoo="a", recipe="real") + " --combine calibrated_concat --dataset fashion-mnist"),
    "amal-b-cal-real": ("amalgamation (b) on real unlabeled images, calibrated_concat",
                        AMALGAMATE.format(zoo="b", recipe="real") + " --combine calibrated_concat --dataset fashion-mnist"),
    "amal-a-pm": ("amalgamation (a), data-free, per-member synthesis (a Fast synthesizer per member), "
                  "calibrated_concat (both the defaults)",
                  AMALGAMATE.format(zoo="a", recipe="fast") + " --synthesis per-member"),
    "amal-b-pm": ("amalgamation (b), data-free, per-member synthesis, uhc for the merged prediction (both the defaults)",
                  AMALGAMATE.format(zoo="b", recipe="fast") + " --synthesis per-member"),
    "amal-a-pm-gs": ("amalgamation (a), data-free, per-member synthesis, group_share",
                     AMALGAMATE.format(zoo="a", recipe="fast") + " --synthesis per-member --combine group_share"),
    "amal-a-gs-real": ("amalgamation (a) on real unlabeled images, group_share",
                       AMALGAMATE.format(zoo="a", recipe="real") + " --combine group_share --dataset fashion-mnist"),
    "amal-a-cfl": ("amalgamation (a), data-free, per-member synthesis, calibrated_concat + CFL feature amalgamation",
                   AMALGAMATE.format(zoo="a", recipe="fast") + " --synthesis per-member --features cfl"),
    "amal-a-ae": ("amalgamation (a), data-free, per-member synthesis, calibrated_concat + layer-wise auto-encoder features",
                  AMALGAMATE.format(zoo="a", recipe="fast") + " --synthesis per-member --features layerwise_ae"),
    "amal-a-cfl-real": ("amalgamation (a) on real unlabeled images, calibrated_concat + CFL feature amalgamation",
                        AMALGAMATE.format(zoo="a", recipe="real") + " --combine calibrated_concat --features cfl"
                        " --dataset fashion-mnist"),
    "amal-a-ae-real": ("amalgamation (a) on real unlabeled images, calibrated_concat + layer-wise auto-encoder features",
                       AMALGAMATE.format(zoo="a", recipe="real") + " --combine calibrated_concat --features layerwise_ae"
                       " --dataset fashion-mnist"),
    "amal-single": ("reference: the amalgamation recipe with the single 10-class teacher, data-free",
                    DISTILL + " --config configs/fashion-mnist/amalgamate-fast.yaml"),
    "amal-single-real": ("reference: the amalgamation recipe with the single 10-class teacher, real images",
                         DISTILL + " --config configs/fashion-mnist/amalgamate-real.yaml"),
    "zskd": ("ZSKD (CPU budget recipe: 12,000 Data Impressions, the best recipe's student training)",
             DISTILL + " --config configs/fashion-mnist/zskd.yaml"),
    "zskd-paper": ("ZSKD, the paper's setting (48,000 DIs, KD at T=20, its augmentation), scaled: 100 DI steps, 20,000 student steps",
                   DISTILL + " --config configs/fashion-mnist/zskd-paper.yaml"),
    "dfnd": ("DFND: the teacher's most confident wild images (digits) and the noise-adapted loss",
             DISTILL + " --config configs/fashion-mnist/dfnd.yaml"),
    "cmi": ("CMI (CPU budget recipe sized like fast's: generator kept across rounds, 2 steps per round)",
            DISTILL + " --config configs/fashion-mnist/cmi.yaml"),
    "lopes": ("Lopes et al. 2017: inputs reconstructed from the teacher's activation records (top layer)",
              LOPES_RECIPE),
    "lopes-all": ("Lopes et al. 2017: inputs reconstructed from the activation records of every layer",
                  LOPES_RECIPE + " options.objective=all_layers"),
    "mosaickd": ("MosaicKD: a generator whose patches a discriminator cannot tell from the wild images' (digits)",
                 DISTILL + " --config configs/fashion-mnist/mosaickd.yaml"),
    "kegnet": ("KegNet (CPU budget recipe: 5 generators of 1500 steps of 64, the official losses and student)",
               DISTILL + " --config configs/fashion-mnist/bench-kegnet.yaml"),
}
#: forms of knowledge on top of KD, on real images (the amal-single-real recipe: 2000 steps of 128 real
#: unlabelled images), each at its paper's weight; every row clips the student's gradient norm at 5, without
#: which DKD, FT, RKD and SP leave this BatchNorm-free student at chance and FSP and NST diverge (the clip
#: alone leaves KD where it was: knowledge-none). CRD draws 1024 negatives instead of 16,384 (16,384 cost
#: about 5 s a step on one thread). ALP-KD and RAIL-KD compare teacher layers of one width: teacher_width=120
#: projects LeNet-5's blocks (1176, 400, 120 wide) to its last block's width (docs/experiments.md).
KNOWLEDGE_ROWS = ("none", "alp_kd::teacher_width=120", "cc", "ckd", "crd::num_negatives=1024", "dkd", "fsp", "ft",
                  "nst", "pkd", "pkt", "rail_kd::teacher_width=120", "rkd", "sp", "vid")
for _entry in KNOWLEDGE_ROWS:
    _knowledge = f" --knowledge {_entry}" if _entry != "none" else ""
    ROWS[f"knowledge-{_entry.split(':')[0]}"] = (
        "KD on real images (amal-single-real's recipe), gradient clip 5"
        + (f", + --knowledge {_entry}" if _knowledge else ", no other knowledge (the reference)"),
        DISTILL + f" --config configs/fashion-mnist/amalgamate-real.yaml student_grad_clip=5{_knowledge}")

def dfkd_command(args: str) -> list[str]:
    return [sys.executable, "-m", "dfkd", *args.split()]


def child_env() -> dict:
    """Environment of every ``dfkd`` subprocess: one CPU thread, this checkout, no display."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")


def teacher_fingerprints(args: str) -> dict:
    """``{checkpoint name: {"sha256": first 12 hex digits, "test_accuracy": ...}}`` of every
    teacher file a run's arguments use (the single teacher, or a zoo's members)."""
    import hashlib

    import torch

    paths = [at_root(a) for a in args.split() if a.endswith(".pt") and at_root(a).exists()]
    for a in args.split():
        if a.endswith(".yaml") and at_root(a).parent.resolve() == Path(ZOO_DIR).resolve() and at_root(a).exists():
            paths += sorted((ZOO_DIR / Path(a).stem.removeprefix("zoo_")).glob("*.pt"))
    prints = {}
    for path in paths:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        prints[path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12],
                             "test_accuracy": meta.get("test_accuracy")}
    return prints


def run_one(row: str, seed: int) -> dict:
    """Run one row for one seed in a subprocess; return (and store) its record."""
    description, template = ROWS[row]
    out = RUNS / row / f"seed{seed}"
    args = template.format(zoo_dir=rel(ZOO_DIR), **{placeholder: rel(KEPT_TEACHERS[row][0])
                                                     for placeholder, row in TEACHER_PLACEHOLDERS.items()})
    if args.startswith("train-teacher"):
        args += f" --seed {seed} --out {rel(out)}.pt"
    else:
        args += f" --seed {seed} --out {rel(out)} --overwrite"
    env = child_env()
    teachers = {} if args.startswith("train-teacher") else teacher_fingerprints(args)
    started = time.perf_counter()
    # peak RSS of this child alone: run it through a tiny wrapper that reports its own rusage
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys;p=subprocess.run(sys.argv[1:]);"
               "print('PEAK_RSS_KB',resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,file=sys.stderr);"
               "sys.exit(p.returncode)", *dfkd_command(args)]
    proc = subprocess.run(wrapper, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kb = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), None)
    record = {"row": row, "description": description, "seed": seed, "command": "dfkd " + args, "returncode": proc.returncode,
              "wall_seconds_total": round(wall, 1), "peak_rss_mib": None if peak_kb is None else round(peak_kb / 1024, 1),
              "teachers": teachers, "machine": machine()}
    if proc.returncode != 0:
        record["error"] = proc.stderr[-2000:]
    elif args.startswith("train-teacher"):
        import torch

        meta = torch.load(f"{out}.pt", map_location="cpu", weights_only=True)["meta"]
        record.update(student_accuracy=meta["test_accuracy"], wall_seconds=meta.get("train_seconds"))
    else:
        summary = json.loads((out / "summary.json").read_text())
        quality = summary.get("sample_quality") or {}
        record.update(student_accuracy=summary["student_accuracy"], agreement=summary["agreement"],
                      wall_seconds=summary["wall_seconds"], images_synthesized=summary["images_synthesized"],
                      steps=summary["steps"], frechet_distance=quality.get("frechet_distance"))
    path = RESULTS / row / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"[{row} seed {seed}] {status} acc={record.get('student_accuracy')} wall={wall:.0f}s", flush=True)
    return record


def adopt_teacher(row: str) -> None:
    """Record a kept teacher checkpoint (:data:`KEPT_TEACHERS`, trained earlier by the row's
    ``dfkd train-teacher`` command) instead of training it again."""
    import torch

    path, seed = KEPT_TEACHERS[row]
    record_path = RESULTS / row / f"seed{seed}.json"
    if record_path.exists() or not path.exists():
        return
    meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    args = ROWS[row][1] + f" --seed {seed} --out {rel(path)}"
    record = {"row": row, "description": ROWS[row][0], "seed": seed, "command": "dfkd " + args, "returncode": 0,
              "student_accuracy": meta["test_accuracy"], "wall_seconds": meta.get("train_seconds"),
              "peak_rss_mib": None, "note": "checkpoint trained before this benchmark run; its own train_seconds"}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))


def ensure_teachers(jobs: int, rows) -> None:
    """Adopt the kept teacher checkpoints and train those the requested rows need but lack."""
    for row in KEPT_TEACHERS:
        adopt_teacher(row)
    wanted = {"teacher"} | {kept for row in rows for placeholder, kept in TEACHER_PLACEHOLDERS.items()
                            if "{" + placeholder + "}" in ROWS[row][1]}
    wanted |= {prior for row in rows for prior in ZOO_PRIORS.get(row, [])}
    wanted |= {row for row in rows if row in KEPT_TEACHERS}
    needed = [row for row in KEPT_TEACHERS if row in wanted and not KEPT_TEACHERS[row][0].exists()]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for row in needed:
            pool.submit(_train_teacher_into, row, *KEPT_TEACHERS[row])


def ensure_zoos(rows) -> None:
    """Train the zoo members the requested amalgamation rows need (one at a time, with
    ``dfkd train-teacher``) and write each scenario's manifest with ``dfkd zoo build``."""
    scenarios = [row.split("-")[1] for row in rows if row.startswith("amal-")]
    wanted = sorted({name for name in scenarios if name in ZOOS})
    env = child_env()
    for zoo in wanted:
        folder = ZOO_DIR / zoo
        folder.mkdir(parents=True, exist_ok=True)
        for member in ZOOS[zoo]:
            checkpoint = ZOO_TEACHERS / f"{member}.pt"
            if not checkpoint.exists():
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                args = f"train-teacher --dataset fashion-mnist --seed 0 --quiet {ZOO_MEMBERS[member]} --out {rel(checkpoint)}"
                print(f"[zoo {zoo}] dfkd {args}", flush=True)
                subprocess.run(dfkd_command(args), cwd=ROOT, env=env, check=True)
            target = folder / checkpoint.name
            if not target.exists():
                shutil.copyfile(checkpoint, target)
        subprocess.run(dfkd_command(f"zoo build {rel(folder)} --out {rel(ZOO_DIR / f'zoo_{zoo}.yaml')}"), cwd=ROOT, env=env, check=True)


def _train_teacher_into(row: str, path: Path, seed: int) -> None:
    record = run_one(row, seed)
    produced = RUNS / row / f"seed{seed}.pt"
    if record["returncode"] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(produced, path)
        # keep a copy where the row's own seed-0 record points
        shutil.copyfile(path, produced)


def fmt(values, scale=100.0, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def machines_used(records) -> str:
    """Where the runs behind the table ran: each distinct ``machine`` of the run records with
    its count, and how many records have no such field (runs made before records named their
    machine), so a report rebuilt elsewhere (``--report-only``) does not pass its own machine
    off as theirs."""
    counts = collections.Counter(record.get("machine") or "" for record in records)
    parts = [f"{name} ({n} run{'s' if n != 1 else ''})" for name, n in sorted(counts.items()) if name]
    if counts.get(""):
        parts.append(f"{counts['']} run{'s' if counts[''] != 1 else ''} recorded before runs named their machine "
                     "(2-core Intel Xeon and AMD EPYC machines, one thread per run)")
    return "; ".join(parts) if parts else "no runs yet"


def teachers_used() -> str:
    """A section naming the teacher checkpoints behind each row's seeds (sha256 prefix and
    test accuracy), so a row that mixes teacher files says so."""
    lines = []
    for row in ROWS:
        groups: dict[str, list[str]] = {}
        for path in sorted((RESULTS / row).glob("seed*.json")) if (RESULTS / row).exists() else []:
            record = json.loads(path.read_text())
            if record.get("command", "").startswith("dfkd train-teacher"):
                continue
            prints = record.get("teachers")
            key = ("the first checkpoints (an earlier machine, not fingerprinted; lenet5_bn 90.67%)" if prints is None else
                   ", ".join(f"{name} {p['sha256']} ({100 * p['test_accuracy']:.2f}%)" for name, p in sorted(prints.items())))
            groups.setdefault(key, []).append(str(record["seed"]))
        if groups:
            lines.append(f"- {row}: " + "; ".join(f"seeds {','.join(seeds)}: {key}" for key, seeds in groups.items()))
    if not lines:
        return ""
    return ("\n## Teacher checkpoints behind each row\n"
            "Each run's teacher files, by sha256 prefix and test accuracy. A fresh machine retrains the teachers with the "
            "same command, but not bit for bit; `benchmarks/teachers/README.md` lists the kept checkpoints with their full "
            "sha256 and the command that made each.\n\n"
            + "\n".join(lines) + "\n")


# Throughput measurements of benchmarks/speed.py kept in benchmarks/results/: one table each,
# (title, [(column label, JSON file), ...], how it was measured).
SPEED_TABLES = [
    ("Channels-last generators, before and after (2026-11-22)",
     [("before", "speed_loaded_machine.json"), ("after", "speed_after_channels_last.json")],
     "Random LeNet-5-BN teacher, one thread, on a machine loaded by three or four other processes (read the "
     "rates as lower bounds). Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py --rounds 2 --json OUT`."),
    ("Fast against DeepInversion (2026-11-22)",
     [("", "speed_fast.json")],
     "A trained `lenet5_bn` teacher, one thread, beside two benchmark runs. Command: "
     "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py --teacher benchmarks/teachers/fm_lenet5_bn_seed0.pt "
     "--rounds 3 --methods deepinversion deepinversion-adi fast best --json OUT` (`best` is `configs/fashion-mnist/best.yaml`)."),
]


def zoo_size_section() -> str:
    """The zoo-size series of ``benchmarks/zoo_scale.py``, if its records exist."""
    path = RESULTS / "zoo_scale.json"
    if not path.exists():
        return ""
    from zoo_scale import table  # the series' own table (benchmarks/ is this script's directory)

    return ("\n## Zoo size\n"
            "Zoos of 2, 3, 5 and 10 Fashion-MNIST members of mixed architectures on parts of the classes, amalgamated "
            "data-free into `lenet5_half` (`amalgamate-fast.yaml`, 500 student steps, `--combine auto --synthesis auto`); "
            "ensemble accuracies are on the real test images. Seconds per student step include every member's "
            "synthesis. Regenerate: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_scale.py --steps 500 --seeds 0 1 2 "
            "--json benchmarks/results/zoo_scale.json`.\n\n" + table(json.loads(path.read_text())) + "\n")


def speed_sections() -> str:
    """The throughput tables of :data:`SPEED_TABLES` whose JSON files exist."""
    parts = []
    for title, files, how in SPEED_TABLES:
        data = [(label, json.loads((RESULTS / name).read_text())) for label, name in files if (RESULTS / name).exists()]
        if not data:
            continue
        methods = list(dict.fromkeys(m for _, d in data for m in d if not m.startswith("_")))
        head = ["method"]
        for label, _ in data:
            prefix = f"{label}: " if label else ""
            head += [f"{prefix}images synthesized/s", f"{prefix}student steps/s (batch)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            cells = [method]
            for _, d in data:
                m = d.get(method)
                cells += (["—", "—"] if m is None else
                          [f"{m['synthesis_images_per_second']:g}", f"{m['student_steps_per_second']:g} ({m['student_batch']})"])
            lines.append("| " + " | ".join(cells) + " |")
        sources = ", ".join(f"`benchmarks/results/{name}`" for _, name in files)
        parts.append(f"\n### {title}\n{how} Raw numbers: {sources}.\n\n" + "\n".join(lines) + "\n")
    if not parts:
        return ""
    return ("\n## Speed of the methods' hot loops\n"
            "`benchmarks/speed.py` times a few synthesis rounds and student steps of each method's benchmark recipe "
            "(`configs/fashion-mnist/bench-*.yaml`); throughput does not depend on the teacher's weights.\n" + "".join(parts))


def reading(accuracy: dict[str, str]) -> str:
    """A short guide to the table; ``accuracy`` maps rows to their formatted accuracy."""
    acc = lambda row: accuracy.get(row, "not run")  # noqa: E731
    return f"""
## Reading the table

- The best data-free rows are `best` ({acc("best")}%: Fast with a small generator and one teacher,
  `configs/fashion-mnist/best.yaml`) and `best-zoo3` ({acc("best-zoo3")}%: the same with the BatchNorm
  statistics of three more models trained on the same images as priors, `--bn-prior`). The best published
  data-free Fashion-MNIST number we know is ZSKD's 79.62%.
- `kd-real` ({acc("kd-real")}%) trains the same student with the same schedule on all real training
  images: what separates the data-free rows from it is the synthetic images, not the student or its
  training. Measured in real images, the `best` bank is worth about 1,000 of them, `best-zoo3`'s about 2,000-3,000.
- The method rows (`dafl`, `deepinversion*`, `zskt`, `dfad`, `fast`) are the papers' recipes, checked against
  their official code, at a CPU budget; each config file says what it changes. DFAD's and ZSKT's generators
  cover a few modes each (hence their seed spread); per-batch DeepInversion sees 6,400-12,800 images.
- `dafl` and `dafl-plain` distill from our 15-epoch, augmented teachers; from a teacher trained like the
  official DAFL code's (3 epochs, no augmentation, about 84%) the same recipe reaches about 64% (`dafl-official-teacher`).
- The `-plain` rows use the `lenet5` teacher without BatchNorm. The Fréchet distance is measured in each
  row's own teacher's features, so the `-plain` rows' values are on another scale.
- The `amal-*` rows amalgamate teachers trained on parts of the classes: in (a) two teachers on disjoint
  halves bound the student by their own concatenated logits (about 59% on real images); in (b) a third,
  overlapping teacher lets `uhc` reconcile them. Members put on one scale (`calibrated_concat`) and
  per-member synthesis (`-pm`) recover most of the gap to one all-class teacher (`amal-single*`).
- The `knowledge-*` rows add one form of knowledge at its paper's weight to KD on real images, against
  `knowledge-none` (the same recipe and gradient clip without it); the method rows `cmi`, `dfnd`, `kegnet`, `lopes`, `mosaickd`, `zskd` are the
  newer papers at a CPU budget (`dfnd` and `mosaickd` read digits as their wild images).
- Wall seconds of runs made while three or four runs shared the two cores (see each record's
  `command` and date in `docs/experiments.md`) overstate their cost; accuracy is unaffected.
- Single runs of one recipe differ by up to about one point between seeds.

The findings behind these rows, each with its date and the command that reproduces it, are in
`docs/experiments.md`.
"""


def write_report() -> Path:
    rows, every_record, accuracy = [], [], {}
    for row in ROWS:
        records = [json.loads(p.read_text()) for p in sorted((RESULTS / row).glob("seed*.json"))] if (RESULTS / row).exists() else []
        ok = [r for r in records if r.get("returncode") == 0]
        if not records:
            continue
        every_record += ok
        per_s = [r["images_synthesized"] / r["wall_seconds"] for r in ok if r.get("images_synthesized") and r.get("wall_seconds")]
        accuracy[row] = fmt([r.get("student_accuracy") for r in ok])
        rows.append("| {row} | {desc} | {acc} | {agr} | {wall} | {imgs} | {ips} | {mem} | {fd} | {seeds} | {pub} |".format(
            row=row, desc=ROWS[row][0], acc=accuracy[row],
            agr=fmt([r.get("agreement") for r in ok]),
            wall=fmt([r.get("wall_seconds") for r in ok], 1, 0),
            imgs=fmt([r.get("images_synthesized") for r in ok], 1, 0),
            ips=fmt(per_s, 1, 0) if per_s else "—",
            mem=fmt([r.get("peak_rss_mib") for r in ok], 1, 0),
            fd=fmt([r.get("frechet_distance") for r in ok], 1, 2),
            seeds=",".join(str(r["seed"]) for r in ok) + ("" if len(ok) == len(records) else f" ({len(records) - len(ok)} failed)"),
            pub=PUBLISHED.get(row, ""),
        ))
    text = f"""# Fashion-MNIST results

Teacher `lenet5_bn` (and `lenet5` where the method applies) -> student `lenet5_half` (the
`best-zoo*` rows also match the BN statistics of the `teacher-*` zoo members; KD stays the teacher's), real
Fashion-MNIST from Debian's `dataset-fashion-mnist` (images resized to 32 px). Final
accuracy on the 10k test split (never a best-epoch pick), mean ± std over the seeds listed.
Each run uses one CPU thread; wall seconds are the run's own (training/distillation loop),
peak memory is the run's whole process.

Regenerate: `.venv/bin/python benchmarks/run_benchmarks.py` (all rows, seeds 0 1 2), or
`--rows ... --seeds ...` for a part; `--report-only` rebuilds this file from
`benchmarks/results/*/seed*.json`. This file is generated: edit `benchmarks/run_benchmarks.py`, not it.

Runs ran on: {machines_used(every_record)}. This file was written on {machine()},
{datetime.date.today().isoformat()}.

| row | what | accuracy % | agreement % | wall s | images synthesized | images/s | peak MiB | Fréchet (teacher features) | seeds | published |
|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\nThe commands of every run are in `benchmarks/results/<row>/seed<k>.json`.\n"
    text += reading(accuracy) + teachers_used() + zoo_size_section() + speed_sections()
    path = ROOT / "benchmarks" / "RESULTS.md"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if not args.report_only:
        started = time.perf_counter()
        ensure_teachers(args.jobs, args.rows)
        ensure_zoos(args.rows)
        todo = [(row, seed) for row in args.rows for seed in args.seeds
                if not (row in KEPT_TEACHERS and seed == KEPT_TEACHERS[row][1] and (RESULTS / row / f"seed{seed}.json").exists())]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: run_one(*job), todo))
        print(f"all runs finished in {time.perf_counter() - started:.0f}s")
    print(write_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
