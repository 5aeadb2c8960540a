"""Teacher zoo manifests: a YAML list of checkpoints with their SHA-256, verified before use.

Format::

    format: dfkd-zoo/1
    teachers:
      - name: lenet5_fmnist_a
        path: lenet5_fmnist_a.pt      # relative to the manifest's directory, or absolute
        sha256: 3f5c...

A file is hashed and loaded from the same bytes, so what is verified is what is used. The
same file may not be listed twice (it would count twice in an ensemble). For a file outside
the manifest's folder a mismatch never reveals that file's hash.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from teachers.checkpoint import CheckpointError, _model_from, _read
from teachers.files import YAMLFileError, load_yaml, write_yaml
from teachers.normalize import NormalizedModel

__all__ = [
    "ZOO_FORMAT",
    "ZooError",
    "ZooEntry",
    "build_manifest",
    "load_manifest",
    "verify_manifest",
    "describe_manifest",
    "format_table",
    "load_zoo",
]

ZOO_FORMAT = "dfkd-zoo/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ZooError(ValueError):
    """A manifest is malformed, or one of its checkpoints is missing, tampered with or broken."""


@dataclass(frozen=True)
class ZooEntry:
    """One teacher of a manifest; ``path`` is absolute; ``in_folder``: :func:`load_manifest` found
    it inside the manifest's folder (only then does a sha256 mismatch show the file's hash)."""

    name: str
    path: Path
    sha256: str
    in_folder: bool = False


def build_manifest(
    directory: str | os.PathLike,
    out_path: str | os.PathLike,
    names: Sequence[str] | Mapping[str, str] | None = None,
) -> dict:
    """Write a manifest of every ``*.pt`` checkpoint in ``directory`` (sorted) to ``out_path``.

    Each checkpoint is read and validated first. Names default to the file stems; ``names``
    may be a sequence aligned with the sorted files or a mapping ``{stem: name}``. Paths are
    stored relative to the manifest's directory where possible. Written atomically; returns
    the manifest dict.
    """
    directory, out_path = Path(directory), Path(out_path)
    files = sorted(p for p in directory.glob("*.pt") if p.is_file())
    if not files:
        raise ZooError(f"no *.pt checkpoints in {directory}")
    if names is None:
        entry_names = [p.stem for p in files]
    elif isinstance(names, Mapping):
        entry_names = [names.get(p.stem, p.stem) for p in files]
    else:
        entry_names = list(names)
        if len(entry_names) != len(files):
            raise ZooError(f"{len(entry_names)} names given for {len(files)} checkpoints in {directory}")
    _check_unique(entry_names, str(out_path))
    base = out_path.resolve().parent
    teachers, seen = [], {}
    for name, file in zip(entry_names, files):
        data = file.read_bytes()
        try:
            _read(data, str(file))
        except CheckpointError as e:
            raise ZooError(f"teacher {name!r}: {e}") from e
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            raise ZooError(f"{directory}: {seen[digest].name} and {file.name} are the same checkpoint (identical bytes); "
                           "it would count twice in an ensemble: remove one")
        seen[digest] = file
        resolved = file.resolve()
        try:
            rel = os.path.relpath(resolved, base)
        except ValueError:  # another drive on Windows
            rel = str(resolved)
        teachers.append({"name": name, "path": Path(rel).as_posix(), "sha256": digest})
    manifest = {"format": ZOO_FORMAT, "teachers": teachers}
    write_yaml(out_path, manifest)
    return manifest


def _check_unique(names: Sequence[str], where: str) -> None:
    seen, dupes = set(), set()
    for n in names:
        (dupes if n in seen else seen).add(n)
    if dupes:
        raise ZooError(f"{where}: duplicate teacher names: {', '.join(sorted(dupes))}")


def load_manifest(path: str | os.PathLike) -> list[ZooEntry]:
    """Parse and check a manifest; entry paths are resolved against its directory."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"zoo manifest not found: {path}")
    try:
        doc = load_yaml(path, what="zoo manifest")
    except YAMLFileError as e:
        raise ZooError(str(e)) from e
    if doc.get("format") != ZOO_FORMAT:
        raise ZooError(f"{path}: unknown zoo format {doc.get('format')!r}; known: {ZOO_FORMAT}")
    items = doc.get("teachers")
    if not isinstance(items, list) or not items:
        raise ZooError(f"{path}: 'teachers' must be a non-empty list")
    base = path.resolve().parent
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ZooError(f"{path}: teachers[{i}] must be a mapping with name, path, sha256")
        missing = [k for k in ("name", "path", "sha256") if k not in item]
        if missing:
            raise ZooError(f"{path}: teachers[{i}] ({item.get('name', '?')!r}) lacks {', '.join(missing)}")
        name, file, digest = str(item["name"]), Path(str(item["path"])), str(item["sha256"]).lower()
        if not _SHA256.match(digest):
            raise ZooError(f"{path}: teacher {name!r}: sha256 must be 64 hex digits, got {item['sha256']!r}")
        if not file.is_absolute():
            file = base / file
        entries.append(ZooEntry(name=name, path=file, sha256=digest, in_folder=file.resolve().is_relative_to(base)))
    _check_unique([e.name for e in entries], str(path))
    first: dict[str, str] = {}
    for e in entries:
        if e.sha256 in first:
            raise ZooError(f"{path}: teachers {first[e.sha256]!r} and {e.name!r} are the same file (sha256 "
                           f"{e.sha256[:12]}...); it would count twice in an ensemble: list it once")
        first[e.sha256] = e.name
    return entries


def _verified(entry: ZooEntry, map_location="cpu", build: bool = True) -> tuple[NormalizedModel | None, dict]:
    if not entry.path.is_file():
        raise ZooError(f"teacher {entry.name!r}: checkpoint not found: {entry.path}")
    data = entry.path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        if not entry.in_folder:  # never tell the hash of a file elsewhere on the machine
            raise ZooError(
                f"teacher {entry.name!r}: {entry.path} (outside the manifest's folder) does not match the manifest's "
                f"sha256 {entry.sha256}; fix the path or rebuild the manifest"
            )
        raise ZooError(
            f"teacher {entry.name!r}: sha256 mismatch for {entry.path}: manifest {entry.sha256} vs file {actual} "
            "(the file changed since the manifest was built)"
        )
    try:
        raw = _read(data, str(entry.path), map_location)
        model = _model_from(raw, str(entry.path), map_location) if build else None
    except CheckpointError as e:
        raise ZooError(f"teacher {entry.name!r}: {e}") from e
    return model, raw["meta"]


def verify_manifest(path: str | os.PathLike) -> list[tuple[ZooEntry, dict]]:
    """Check that every file exists, matches its sha256 and loads; return ``(entry, meta)``."""
    out = []
    for entry in load_manifest(path):
        _model, meta = _verified(entry)
        out.append((entry, meta))
    return out


def load_zoo(path: str | os.PathLike, map_location="cpu") -> list[tuple[str, NormalizedModel, dict]]:
    """Verify a manifest and load its teachers: ``[(name, model (eval mode), meta), ...]``."""
    out = []
    for entry in load_manifest(path):
        model, meta = _verified(entry, map_location)
        out.append((entry.name, model, meta))
    return out


def describe_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows ``name, arch, dataset, classes, params, accuracy`` for ``dfkd zoo list``."""
    rows = []
    for entry in load_manifest(path):
        model, meta = _verified(entry)
        rows.append(
            {
                "name": entry.name,
                "arch": model.arch,
                "dataset": meta.get("dataset"),
                "classes": list(meta.get("classes", [])),
                "params": int(sum(p.numel() for p in model.parameters())),
                "accuracy": meta.get("test_accuracy"),
            }
        )
    return rows


def _fmt_classes(classes: Sequence[Any]) -> str:
    if classes and all(isinstance(c, int) for c in classes) and list(classes) == list(
        range(classes[0], classes[0] + len(classes))
    ):
        return f"{classes[0]}-{classes[-1]}" if len(classes) > 1 else str(classes[0])
    text = ",".join(str(c) for c in classes)
    return text if len(text) <= 24 else text[:21] + "..."


def _fmt_params(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`describe_manifest` rows."""
    header = ["name", "arch", "dataset", "classes", "params", "accuracy"]
    body = [
        [
            str(r.get("name", "")),
            str(r.get("arch", "")),
            str(r.get("dataset", "") or "-"),
            _fmt_classes(r.get("classes", [])),
            _fmt_params(int(r.get("params", 0))),
            "-" if r.get("accuracy") is None else f"{100 * float(r['accuracy']):.2f}%",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {"params", "accuracy"}

    def line(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
