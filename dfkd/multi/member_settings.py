"""The settings of per-member synthesis (:mod:`dfkd.multi.per_member`): which methods it applies
to, its defaults and their checks, how a zoo's budget is split, and what ``synthesis="auto"``
resolves to."""
from __future__ import annotations

from typing import Sequence

from generators.base import SynthesizerOptionError

__all__ = ["PER_MEMBER_METHODS", "DEFAULTS", "SYNTHESIS_MODES", "check_per_member", "check_settings", "split_budget",
           "resolve_synthesis"]

#: the methods whose synthesis can be split by member: they invert a teacher's own BatchNorm
#: statistics and classes into a bank of images
PER_MEMBER_METHODS = ("fast", "deepinversion")

#: per-member settings and their defaults (``synthesis_options`` of dfkd.amalgamate)
DEFAULTS = {"origin_prior": 0.9, "negative_weight": 0.0, "cross_member": True, "balance": True,
            "cache_targets": False}


def check_per_member(method: str) -> None:
    """Refuse, in one line, a method per-member synthesis does not apply to."""
    if method == "real":
        raise SynthesizerOptionError("per-member synthesis does not apply to real images (they have no origin member); "
                                     "use --synthesis shared")
    if method not in PER_MEMBER_METHODS:
        raise SynthesizerOptionError(
            f"per-member synthesis inverts each member's own BatchNorm statistics and classes into a bank of images; "
            f"method {method!r} does not, so it cannot be split by member: use --synthesis shared, or one of "
            f"{', '.join(PER_MEMBER_METHODS)}")


def split_budget(total: int, counts: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``counts`` (largest remainders; each share at least 1
    when ``total >= len(counts)``); the shares sum to ``total``."""
    counts = [int(c) for c in counts]
    if total < 0 or not counts or min(counts) <= 0:
        raise ValueError(f"cannot split {total} by {counts}")
    exact = [total * c / sum(counts) for c in counts]
    shares = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    if total >= len(counts):  # nobody gets nothing: take from the largest shares
        for i in range(len(shares)):
            while shares[i] == 0:
                donor = max(range(len(shares)), key=lambda j: shares[j])
                shares[donor] -= 1
                shares[i] += 1
    return shares


SYNTHESIS_MODES = ("auto", "per-member", "shared")


def check_settings(settings: dict | None) -> dict:
    """The per-member settings over :data:`DEFAULTS`; an unknown key or an ``origin_prior``
    outside ``(0, 1]`` is a one-line error."""
    unknown = sorted(set(settings or {}) - set(DEFAULTS))
    if unknown:
        raise SynthesizerOptionError(f"unknown per-member setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **(settings or {})}
    if not 0.0 < float(merged["origin_prior"]) <= 1.0:
        raise SynthesizerOptionError(f"origin_prior must be in (0, 1], got {merged['origin_prior']}")
    if merged["cache_targets"] not in (False, True, "others"):
        raise SynthesizerOptionError(f"cache_targets must be false, true or 'others', got {merged['cache_targets']!r}")
    if float(merged["negative_weight"]) < 0:
        raise SynthesizerOptionError(f"negative_weight must be 0 or more, got {merged['negative_weight']}")
    return merged


def resolve_synthesis(requested: str, method: str, members: int, settings: dict | None = None) -> tuple[str, str]:
    """``"per-member"`` or ``"shared"`` for a run's ``synthesis`` setting, and why. ``"auto"``:
    per-member for a zoo of several members with a method of :data:`PER_MEMBER_METHODS`
    (on the Fashion-MNIST zoos it beats shared synthesis, docs/experiments.md), shared
    otherwise (one member, real images, generator methods). An explicit ``"per-member"`` for
    a method it does not apply to is refused (:func:`check_per_member`)."""
    if requested not in SYNTHESIS_MODES:
        raise SynthesizerOptionError(f"unknown synthesis {requested!r}; use one of: {', '.join(SYNTHESIS_MODES)}")
    check_settings(settings)
    if requested == "per-member":
        check_per_member(method)
        return "per-member", "asked for"
    if requested == "shared":
        return "shared", "asked for"
    if members < 2:
        return "shared", "one member"
    if method not in PER_MEMBER_METHODS:
        return "shared", f"method {method!r} cannot be split by member"
    return "per-member", f"{members} members, method {method!r}"
