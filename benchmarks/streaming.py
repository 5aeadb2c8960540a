"""Peak memory of streaming a transfer set, against the set's size.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streaming.py --images 2000 20000 --shape 3 64 64

Writes a folder of uint8 ``.npy`` shards (random pixels, 2,000 images a shard) for each size
under ``benchmarks/runs/streaming/``, then, in a fresh process per size, reads every image once
through :class:`dfkd.data.folder.ImageFolderSet` (what ``--transfer-set`` and the ``real``
method read) and prints the process's peak resident memory. Measured, never asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "runs" / "streaming"
READ_ALL = """
import resource, sys
from dfkd.data.folder import ImageFolderSet
data = ImageFolderSet(sys.argv[1], [int(v) for v in sys.argv[2:]])
for i in range(len(data)):
    data[i]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_set(images: int, shape: list[int]) -> Path:
    import torch

    from dfkd.data.folder import write_shard

    folder = WORK / f"{images}"
    if folder.is_dir() and sum(1 for _ in folder.glob("*.npy")) == -(-images // 2000):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for k, start in enumerate(range(0, images, 2000)):
        write_shard(folder / f"shard-{k:05d}.npy", torch.rand(min(2000, images - start), *shape, generator=generator))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="*", type=int, default=[2000, 20000])
    parser.add_argument("--shape", nargs=3, type=int, default=[3, 64, 64])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    print("| images | on disk MiB | peak resident MiB |\n|---|---|---|")
    for n in args.images:
        folder = write_set(n, args.shape)
        out = subprocess.run([sys.executable, "-c", READ_ALL, str(folder), *map(str, args.shape)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        disk = sum(p.stat().st_size for p in folder.glob("*.npy")) / 2**20
        print(f"| {n} | {disk:.0f} | {int(out.stdout.split()[-1]) / 1024:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
