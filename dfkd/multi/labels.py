"""The union label space of a teacher zoo: which union class each member's output is.

Classes are keyed by their original ids (members of one data set share a class by id), by
``class_map`` (the user says which outputs are one class), or, for ``allow_mixed`` members of
different data sets, by ``(data set, id)`` in member order. Members that give one class two
names, or one name to two classes, are refused (:class:`EnsembleError`).
"""
from __future__ import annotations

from typing import Mapping, Sequence


class EnsembleError(ValueError):
    """Members that cannot be merged as asked (data sets, image shapes, classes)."""


def union_label_space(names: Sequence[str], metas: Sequence[Mapping], allow_mixed: bool, class_map: Mapping,
                      classes: Sequence[int] | None):
    """The union label space of members ``names`` with ``metas`` (see
    :class:`dfkd.multi.ensemble.TeacherEnsemble`): returns (each member's union keys, the keys in
    union order, the union ids, the class names)."""
    datasets = [m.get("dataset") for m in metas]
    mixed = allow_mixed and len(set(datasets)) > 1
    member_keys: list[list] = []
    names_of: dict = {}
    named: dict = {}  # union key -> (member, class name) from members that name their classes
    key_of: dict = {}  # class name -> (member, union key)
    for name, meta, dataset in zip(names, metas, datasets):
        own = [int(c) for c in meta["classes"]]
        labels = [str(c) for c in meta.get("class_names") or own]
        if len(labels) != len(own):
            raise EnsembleError(f"member {name!r}: {len(own)} classes but {len(labels)} class_names")
        if name in class_map:
            keys = [int(c) for c in class_map[name]]
            if len(keys) != len(own):
                raise EnsembleError(f"member {name!r}: class_map gives {len(keys)} union ids for its "
                                    f"{len(own)} classes")
        elif mixed:
            keys = [(dataset, c) for c in own]
            labels = [f"{dataset}:{n}" for n in labels]
        else:
            keys = own
        if len(set(keys)) != len(keys):
            raise EnsembleError(f"member {name!r}: a class appears twice in {keys}")
        member_keys.append(keys)
        for k, label in zip(keys, labels):
            names_of.setdefault(k, label)
        if meta.get("class_names") and name not in class_map:  # a class_map says which classes are one
            _check_names(name, keys, labels, named, key_of)
    if mixed:
        order = []
        for keys in member_keys:
            order += [k for k in keys if k not in order]
        return member_keys, order, list(range(len(order))), [names_of[k] for k in order]
    union = sorted(names_of)
    if classes is not None:
        allowed = sorted({int(c) for c in classes})
        for name, keys in zip(names, member_keys):
            outside = [k for k in keys if k not in set(allowed)]
            if outside:
                raise EnsembleError(f"member {name!r}: classes {outside} do not fit the union label space "
                                    f"{allowed}")
        union = allowed
    return member_keys, union, list(union), [names_of.get(k, str(k)) for k in union]

def _check_names(name: str, keys: list, labels: list[str], named: dict, key_of: dict) -> None:
    """Refuse two members that give one class two names, or one name to two classes."""
    for k, label in zip(keys, labels):
        (other, other_label), (other2, other_key) = named.setdefault(k, (name, label)), key_of.setdefault(label, (name, k))
        clash = (f"class {k} is {other_label!r} for member {other!r} but {label!r}" if other_label != label else
                 f"{label!r} is class {other_key} for member {other2!r} but class {k}" if other_key != k else None)
        if clash:
            raise EnsembleError(f"class names clash: {clash} for member {name!r}; give class_map={{member: [union "
                                "ids]}} to say which classes are the same")
