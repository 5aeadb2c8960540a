"""Session-11 diagnostic: what is the synthetic bank worth in real images?

``dfkd distill ARGS`` (use ``--config configs/fashion-mnist/kd-real.yaml``: KD on real,
unlabeled training images with the data-free recipes' student schedule) with the real images
cut to a random subset of ``N_REAL`` images (environment variable; drawn with
``torch.Generator().manual_seed(SUBSET_SEED)``, default 0), so the data-free students can be
placed against KD from N real images. Not in the package. Usage (repo root):
N_REAL=1000 PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/screens/session11/few_real.py --quiet --teacher TEACHER --config configs/fashion-mnist/kd-real.yaml --seed 0 --out DIR
"""
import os
import sys

import torch

from generators.real import RealImages

n_real = int(os.environ["N_REAL"])
subset_seed = int(os.environ.get("SUBSET_SEED", "0"))
original_init = RealImages.__init__


def subset_init(self, teacher, image_shape, num_classes, device="cpu", seed=0, images=None, **options):
    if images is not None:
        pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(subset_seed))[:n_real]
        images = images[pick]
        print(f"few_real: KD on {images.shape[0]} real images", file=sys.stderr)
    original_init(self, teacher, image_shape, num_classes, device, seed, images=images, **options)


RealImages.__init__ = subset_init

if __name__ == "__main__":
    from dfkd.cli import main

    sys.exit(main(["distill", *sys.argv[1:]]))
