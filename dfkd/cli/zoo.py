"""``dfkd zoo build | verify | list``: teacher zoo manifests."""
from __future__ import annotations

from dfkd.cli.common import add_common, formatter
from teachers import build_manifest, describe_manifest, format_table, verify_manifest


def add_parser(sub) -> None:
    p = sub.add_parser("zoo", help="build, verify and list teacher zoo manifests", formatter_class=formatter)
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    zb = zsub.add_parser("build", help="manifest of every checkpoint in a directory")
    zb.add_argument("directory")
    zb.add_argument("--out", required=True, help="manifest to write (zoo.yaml)")
    zv = zsub.add_parser("verify", help="check every entry's sha256 and that it loads")
    zv.add_argument("manifest")
    zl = zsub.add_parser("list", help="table of name, arch, dataset, classes, params, accuracy")
    zl.add_argument("manifest")
    add_common(p, config=False)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.zoo_command == "build":
        manifest = build_manifest(args.directory, args.out)
        print(f"wrote {args.out} with {len(manifest['teachers'])} teachers")
    elif args.zoo_command == "verify":
        entries = verify_manifest(args.manifest)
        print(f"{args.manifest}: {len(entries)} teachers verified (sha256 and load)")
    elif args.zoo_command == "list":
        print(format_table(describe_manifest(args.manifest)))
    return 0
