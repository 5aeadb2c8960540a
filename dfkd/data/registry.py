"""The data-set registry (:func:`register_dataset`), class subsets and image sizes."""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from dfkd.data.types import DatasetError, DatasetInfo, RawSplit
from teachers.registry import Registry

# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


class DatasetSpec:
    """Describes one data set and knows how to read its files.

    Subclasses set the class attributes and implement :meth:`load_raw`. ``name`` is filled in
    by :func:`register_dataset`.
    """

    name: str = ""
    class_names: tuple[str, ...] = ()
    channels: int = 1
    native_size: int = 32
    default_image_size: int = 32
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    split_seed: int | None = None
    #: ``source`` reported by :func:`dataset_info` (which does not look for files).
    static_source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_raw(self, split: str, root: Path | None, download: bool) -> RawSplit:  # pragma: no cover
        raise NotImplementedError("abstract: each data set spec implements load_raw()")

    def class_names_from(self, raw: RawSplit) -> list[str]:
        """Class names for a loaded split (defaults to the constant ``class_names``)."""
        return list(self.class_names)


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def _as_spec(name: str, obj: Any) -> DatasetSpec:
    spec = obj
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "load_raw")):
        spec = obj()
    missing = [a for a in ("class_names", "channels", "mean", "std", "load_raw") if not hasattr(spec, a)]
    if missing:
        raise DatasetError(f"cannot register {name!r}: the spec lacks {', '.join(missing)}")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise DatasetError(f"cannot register {name!r}: mean/std need one value per channel ({spec.channels})")
    spec.name = name
    return spec


#: Every data set by name; names are case-insensitive and ``_`` equals ``-``.
DATASETS: Registry[DatasetSpec] = Registry("data set", DatasetError, key=_key, on_register=_as_spec)


def register_dataset(name: str) -> Callable[[Any], Any]:
    """Decorator that registers a data set under ``name``.

    It accepts a :class:`DatasetSpec` subclass (instantiated without arguments), a spec
    instance, or a zero-argument function that returns a spec. The decorated object is
    returned unchanged. Names are case-insensitive and ``_`` equals ``-``.
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of the registered data sets, sorted."""
    return DATASETS.names()


def get_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)


# ---------------------------------------------------------------------------------------------
# Class subsets and sizes
# ---------------------------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_classes(text_or_list: str | Sequence[int] | int | None) -> list[int] | None:
    """Parse a class selection into a list of class ids (order kept), or ``None`` for all.

    Accepts ``None``, ``""`` or ``"all"`` (all classes), ``"0,1,2"``, ranges ``"0-4"``
    (inclusive), mixtures ``"0-4,7"``, a single int, or a list/tuple of ints. Duplicates,
    negative ids, reversed ranges, non-integers and an empty list raise :class:`DatasetError`.
    Whether ids are below the number of classes is checked when a data set is chosen.
    """
    if text_or_list is None:
        return None
    if isinstance(text_or_list, str):
        text = text_or_list.strip()
        if text == "" or text.lower() == "all":
            return None
        ids: list[int] = []
        for part in text.split(","):
            m = _RANGE_RE.match(part)
            if not m:
                raise DatasetError(
                    f"cannot parse class selection {text_or_list!r} (bad part {part.strip()!r}); "
                    "use comma-separated ids and inclusive ranges, e.g. '0,1,2', '0-4' or '0-4,7'"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise DatasetError(f"reversed class range {part.strip()!r} in {text_or_list!r}; write it as '{hi}-{lo}'")
            ids.extend(range(lo, hi + 1))
    elif isinstance(text_or_list, bool):
        raise DatasetError(f"class selection must be ids, got {text_or_list!r}")
    elif isinstance(text_or_list, numbers.Integral):
        ids = [int(text_or_list)]
    else:
        try:
            items = list(text_or_list.tolist() if hasattr(text_or_list, "tolist") else text_or_list)
        except TypeError:
            raise DatasetError(f"class selection must be a string or a list of ints, got {text_or_list!r}") from None
        bad = [c for c in items if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise DatasetError(f"class ids must be integers, got {bad!r} in {text_or_list!r}")
        ids = [int(c) for c in items]
    if not ids:
        raise DatasetError("empty class selection; give at least one class id, or None for all classes")
    negative = [c for c in ids if c < 0]
    if negative:
        raise DatasetError(f"class ids must be >= 0, got {negative}")
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise DatasetError(f"duplicate class ids {dups} in {text_or_list!r}; list each class once")
    return ids


def resolve_classes(spec: DatasetSpec, classes: Any) -> list[int]:
    """Validated original class ids in label order (all classes when ``classes`` is None)."""
    n = spec.num_classes
    ids = parse_classes(classes)
    if ids is None:
        return list(range(n))
    bad = [c for c in ids if c >= n]
    if bad:
        raise DatasetError(f"class ids {bad} are out of range for {spec.name!r}: valid ids are 0..{n - 1}")
    return ids


def resolve_size(spec: DatasetSpec, image_size: Any) -> int:
    if image_size is None:
        return int(spec.default_image_size)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer (square side in pixels), got {image_size!r}")
    return int(image_size)


def make_info(spec: DatasetSpec, ids: list[int], size: int, split: str, source: str, names: list[str], split_seed) -> DatasetInfo:
    return DatasetInfo(
        name=spec.name,
        num_classes=len(ids),
        class_names=[names[c] for c in ids],
        classes=list(ids),
        image_shape=(int(spec.channels), size, size),
        mean=tuple(float(m) for m in spec.mean),
        std=tuple(float(s) for s in spec.std),
        source=source,
        split=split,
        split_seed=split_seed,
    )


def dataset_info(name: str, classes: Any = None, image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of the training split, built without reading any file.

    ``source`` is ``"sklearn"`` for ``digits`` and ``""`` for file-based data sets (where the
    files are is only known once they are loaded).
    """
    spec = get_spec(name)
    ids = resolve_classes(spec, classes)
    size = resolve_size(spec, image_size)
    return make_info(spec, ids, size, "train", spec.static_source, list(spec.class_names), spec.split_seed)


