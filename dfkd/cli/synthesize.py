"""``dfkd synthesize``: write a distillation run's synthetic images as a transfer set."""
from __future__ import annotations

from dfkd.api import synthesize
from dfkd.cli.common import add_common, formatter


def add_parser(sub) -> None:
    p = sub.add_parser("synthesize", help="write a run's synthetic images as .npy shards with a manifest",
                       formatter_class=formatter,
                       description="Rebuild the synthesizer of RUN_DIR from its config and saved state and write "
                                   "IMAGES of its images (uint8 .npy shards, one set per rank of a torchrun run) with "
                                   "manifest.json; dfkd distill --method real --transfer-set OUT trains from them.")
    p.add_argument("run_dir", help="a dfkd distill run directory (with state.pt)")
    p.add_argument("--out", required=True, help="folder to write the transfer set to")
    p.add_argument("--images", type=int, default=10_000, help="images to write")
    p.add_argument("--shard-size", type=int, default=4096, help="images per .npy shard")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    add_common(p, config=False)
    p.set_defaults(func=run)


def run(args) -> int:
    manifest = synthesize(args.run_dir, args.out, images=args.images, shard_size=args.shard_size, device=args.device,
                          overwrite=args.overwrite)
    per_class = ", ".join(f"{name} {n}" for name, n in manifest["images_per_class"].items())
    print(f"wrote {manifest['images']} images of {manifest['method']} in {len(manifest['shards'])} shard(s) to "
          f"{args.out} (by the teacher's prediction: {per_class})")
    return 0
