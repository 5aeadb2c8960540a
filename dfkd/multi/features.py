"""Knowledge amalgamation: merging several teachers' *features* (and logits) into one student.

Features are captured with :class:`dfkd.core.taps.FeatureTap` on module paths (no model surgery).
Layer pairs are declared as ``"student_path:member.path"`` strings (comma-separated on the
command line), e.g. ``"relu3:digits_a.relu3,relu3:digits_b.relu3"``: the student's module at
``relu3`` is paired with module ``relu3`` of the member named ``digits_a`` (paths inside the
member's network, as for any dfkd model). Pairs that share a student path form one *group*
(``cfl`` and ``layerwise_ae`` merge all teachers of a group into that one student layer).
Without a spec, the last ``block_paths`` entry of the student is paired with the last one of
every member.

Methods of :class:`FeatureAmalgamator` (named loss terms; adapters are 1x1 convolutions for
``N x C x H x W`` features and linear layers for ``N x C`` ones):

- ``"hint"`` -- FitNets hints (Romero et al., ICLR 2015, arXiv:1412.6550), per pair:
  ``hint = mean_pairs MSE(r(f_S), f_T)`` with a regressor ``r`` from the student's to the
  teacher's channels.
- ``"attention"`` -- attention transfer (Zagoruyko & Komodakis, ICLR 2017), per pair:
  ``attention = sum_pairs mean (a_S - a_T)^2`` (:func:`dfkd.core.losses.attention_transfer_loss`);
  no adapter, 4-D features only.
- ``"cfl"`` -- common feature learning (Luo et al., IJCAI 2019, "Knowledge amalgamation from
  heterogeneous networks by common feature learning"), per group: encoders ``h_S``, ``h_i``
  into a shared space of ``common_channels`` channels and decoders ``g_i`` back::

      cfl_mmd   = sum_i MMD^2( n(h_S(f_S)), n(h_i(f_Ti)) )        (n: per-sample l2 normalise)
      cfl_recon = sum_i MSE( g_i(h_i(f_Ti)), f_Ti )

  with the Gaussian-kernel :func:`mmd` over the flattened features of a batch.
- ``"layerwise_ae"`` -- layer-wise amalgamation with an auto-encoder (Shen et al., AAAI 2019,
  "Amalgamating knowledge towards comprehensive classification"), per group: the teachers'
  features are concatenated, ``F = [f_T1; f_T2; ...]``, encoded to the student's width,
  ``r = E(F)``, and decoded back; the student's (1x1-aligned) feature learns the code::

      ae_recon = MSE( D(E(F)), F )
      ae_align = MSE( A(f_S), stopgrad(r) )

Feature maps of one pair/group are average-pooled to their smallest spatial size; that size
must divide every map's size exactly, and all features of a pair/group must have the same
number of dimensions (2-D or 4-D). Anything else is an error naming the layers.

:class:`AmalgamationSynthesizer` wraps any synthesizer so that the engine's student loss is
the combiner's (KD against the merged target, or the UHC loss) plus the feature terms; see
its docstring for the adapter parameters and the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.losses import attention_transfer_loss
from dfkd.core.taps import FeatureTap, block_paths

__all__ = [
    "AmalgamationError",
    "LayerPair",
    "parse_layers",
    "default_layers",
    "mmd",
    "FeatureAmalgamator",
    "FEATURE_METHODS",
]

FEATURE_METHODS = ("cfl", "layerwise_ae", "hint", "attention")
#: Gaussian bandwidths of the CFL MMD (as in the authors' code), for l2-normalised features.
DEFAULT_SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)


class AmalgamationError(ValueError):
    """A layer spec that names unknown members or layers, or shapes no adapter can bridge."""


# ----------------------------------------------------------------------------- MMD
def mmd(x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate).

    For samples ``x`` (``n x d``) and ``y`` (``m x d``) and
    ``k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2))``::

        MMD^2 = 1/n^2 sum_ij k(x_i, x_j) + 1/m^2 sum_ij k(y_i, y_j) - 2/(nm) sum_ij k(x_i, y_j)

    (Gretton et al., JMLR 2012; the V-statistic, including ``i = j``). Inputs of more than
    two dimensions are flattened per sample.
    """
    x, y = x.flatten(1).float(), y.flatten(1).float()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd: samples of different dimension {x.shape[1]} and {y.shape[1]}")

    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in sigmas)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2.0 * kernel(x, y).mean()


# ----------------------------------------------------------------------------- layer specs
@dataclass(frozen=True)
class LayerPair:
    """Student module ``student`` paired with module ``path`` of member ``teacher``."""

    student: str
    teacher: str
    path: str

    def __str__(self) -> str:
        return f"{self.student}:{self.teacher}.{self.path}"


def parse_layers(spec: str | Iterable[Any], teacher_names: Sequence[str]) -> list[LayerPair]:
    """``"s_path:member.path,..."`` (or a list of such strings, ``LayerPair`` s or
    ``(student, member, path)`` tuples) -> pairs. Member names may contain dots: the longest
    member name followed by ``.`` wins."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    names = sorted(teacher_names, key=len, reverse=True)
    pairs = []
    for item in items:
        if isinstance(item, LayerPair):
            pair = item
        elif isinstance(item, (tuple, list)) and len(item) == 3:
            pair = LayerPair(*(str(v) for v in item))
        else:
            text = str(item).strip()
            student, sep, rest = text.partition(":")
            member = next((n for n in names if rest.startswith(n + ".")), None)
            if not sep or not student or member is None or len(rest) <= len(member) + 1:
                raise AmalgamationError(
                    f"bad layer pair {text!r}: use student_path:member.path with a member among {', '.join(teacher_names)}"
                )
            pair = LayerPair(student, member, rest[len(member) + 1:])
        if pair.teacher not in teacher_names:
            raise AmalgamationError(f"layer pair {pair}: unknown member {pair.teacher!r}; members: {', '.join(teacher_names)}")
        pairs.append(pair)
    if not pairs:
        raise AmalgamationError("the layer spec is empty")
    return pairs


def default_layers(ensemble, student: nn.Module) -> list[LayerPair]:
    """The student's last block paired with every member's last block (``block_paths``)."""
    s_blocks = block_paths(student)
    if not s_blocks:
        raise AmalgamationError("the student declares no block_paths; give the layer pairs explicitly (--layers)")
    pairs = []
    for name, member in zip(ensemble.names, ensemble.members):
        t_blocks = block_paths(member)
        if not t_blocks:
            raise AmalgamationError(f"member {name!r} declares no block_paths; give the layer pairs explicitly (--layers)")
        pairs.append(LayerPair(s_blocks[-1], name, t_blocks[-1]))
    return pairs


# ----------------------------------------------------------------------------- shapes and adapters
def _common_size(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """Common spatial size of the named feature shapes ``(N, C[, H, W])`` (None for 2-D)."""
    dims = {len(s) for s in shapes.values()}
    listing = ", ".join(f"{k} {list(s[1:])}" for k, s in shapes.items())
    if len(dims) != 1 or dims.pop() not in (2, 4):
        raise AmalgamationError(f"no adapter can bridge these features (need all 4-D maps or all 2-D vectors): {listing}")
    first = next(iter(shapes.values()))
    if len(first) == 2:
        return None
    h = min(s[2] for s in shapes.values())
    w = min(s[3] for s in shapes.values())
    for k, s in shapes.items():
        if s[2] % h or s[3] % w:
            raise AmalgamationError(f"feature map {k} ({s[2]}x{s[3]}) cannot be pooled evenly to {h}x{w}: {listing}")
    return h, w


def _pool(f: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(f.shape[-2:]) == size:
        return f
    return F.adaptive_avg_pool2d(f, size)


def _proj(c_in: int, c_out: int, spatial: bool) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 1) if spatial else nn.Linear(c_in, c_out)


def _first_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the amalgamator
class FeatureAmalgamator:
    """Feature-level amalgamation of an ensemble's members into a student (module docstring).

    Args:
        ensemble: a :class:`dfkd.multi.ensemble.TeacherEnsemble`.
        student: the student model (its paths are resolved like any dfkd model's).
        spec: layer pairs (see :func:`parse_layers`); None: :func:`default_layers`.
        method: ``"cfl"``, ``"layerwise_ae"``, ``"hint"`` or ``"attention"``.
        common_channels: width of the CFL common space (default: the student layer's).
        sigmas: Gaussian bandwidths of the CFL MMD.

    Forward hooks are registered on the members and the student at construction (one
    dummy forward on zeros, in eval mode, infers the shapes). ``losses(images)`` runs both
    models and returns the named terms; ``losses_from_taps()`` reuses the features of the
    last forward passes (the teacher's are detached). ``parameters()`` are the adapters'
    (they must be optimised together with the student); ``close()`` removes the hooks.
    """

    def __init__(self, ensemble, student: nn.Module, spec=None, method: str = "cfl",
                 common_channels: int | None = None, sigmas: Sequence[float] = DEFAULT_SIGMAS):
        if method not in FEATURE_METHODS:
            raise AmalgamationError(f"unknown feature method {method!r}; known: {', '.join(FEATURE_METHODS)}")
        self.ensemble, self.student, self.method = ensemble, student, method
        self.sigmas = tuple(float(s) for s in sigmas)
        self.pairs = default_layers(ensemble, student) if spec is None else parse_layers(spec, ensemble.names)
        self.teacher_taps = {}
        for name in dict.fromkeys(p.teacher for p in self.pairs):
            paths = list(dict.fromkeys(p.path for p in self.pairs if p.teacher == name))
            self.teacher_taps[name] = FeatureTap(ensemble.member(name), paths)
        self.student_tap = FeatureTap(student, list(dict.fromkeys(p.student for p in self.pairs)))
        try:
            shapes = self._probe()
            self.adapters = nn.ModuleDict()
            self._build(shapes, common_channels)
        except Exception:
            self.close()
            raise
        self.adapters.to(_first_device(student))

    # -- construction ----------------------------------------------------------------------
    def _probe(self) -> dict[str, tuple[int, ...]]:
        device = _first_device(self.student)
        x = torch.zeros(2, *self.ensemble.image_shape, device=device)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.ensemble(x)
                self.student(x)
        finally:
            self.student.train(was_training)
        shapes = {f"student.{p}": tuple(self.student_tap[p].shape) for p in self.student_tap.paths}
        for name, tap in self.teacher_taps.items():
            shapes.update({f"{name}.{p}": tuple(tap[p].shape) for p in tap.paths})
        self._clear()
        return shapes

    def _groups(self) -> dict[str, list[LayerPair]]:
        groups: dict[str, list[LayerPair]] = {}
        for pair in self.pairs:
            groups.setdefault(pair.student, []).append(pair)
        return groups

    def _build(self, shapes, common_channels) -> None:
        self.sizes: dict[str, tuple[int, int] | None] = {}
        if self.method in ("hint", "attention"):
            for k, pair in enumerate(self.pairs):
                s_key, t_key = f"student.{pair.student}", f"{pair.teacher}.{pair.path}"
                size = _common_size({s_key: shapes[s_key], t_key: shapes[t_key]})
                self.sizes[str(k)] = size
                if self.method == "attention" and size is None:
                    raise AmalgamationError(f"attention transfer needs 4-D feature maps: {s_key} {list(shapes[s_key][1:])}, "
                                            f"{t_key} {list(shapes[t_key][1:])}")
                if self.method == "hint":
                    self.adapters[f"hint{k}"] = _proj(shapes[s_key][1], shapes[t_key][1], size is not None)
            return
        for g, (s_path, pairs) in enumerate(self._groups().items()):
            s_key = f"student.{s_path}"
            keys = [f"{p.teacher}.{p.path}" for p in pairs]
            size = _common_size({s_key: shapes[s_key], **{k: shapes[k] for k in keys}})
            self.sizes[str(g)] = size
            spatial, cs, cts = size is not None, shapes[s_key][1], [shapes[k][1] for k in keys]
            if self.method == "cfl":
                d = int(common_channels or cs)
                block = nn.ModuleDict({
                    "enc_s": _proj(cs, d, spatial),
                    "enc_t": nn.ModuleList(_proj(c, d, spatial) for c in cts),
                    "dec_t": nn.ModuleList(_proj(d, c, spatial) for c in cts),
                })
            else:
                block = nn.ModuleDict({
                    "enc": _proj(sum(cts), cs, spatial),
                    "dec": _proj(cs, sum(cts), spatial),
                    "align": _proj(cs, cs, spatial),
                })
            self.adapters[f"group{g}"] = block

    # -- losses ------------------------------------------------------------------------------
    def _teacher_feature(self, pair: LayerPair) -> torch.Tensor:
        return self.teacher_taps[pair.teacher][pair.path].detach().float()

    def _student_feature(self, path: str) -> torch.Tensor:
        return self.student_tap[path].float()

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the ensemble (no gradient) and the student on ``images``; the named terms."""
        with torch.no_grad():
            self.ensemble(images)
        self.student(images)
        return self.losses_from_taps()

    def losses_from_taps(self) -> dict[str, torch.Tensor]:
        """The named terms from the features captured by the last forward passes."""
        try:
            if self.method == "hint":
                terms = [F.mse_loss(_pool(self.adapters[f"hint{k}"](self._student_feature(p.student)), self.sizes[str(k)]),
                                    _pool(self._teacher_feature(p), self.sizes[str(k)]))
                         for k, p in enumerate(self.pairs)]
                return {"hint": torch.stack(terms).mean()}
            if self.method == "attention":
                terms = [attention_transfer_loss(_pool(self._student_feature(p.student), self.sizes[str(k)]),
                                                 _pool(self._teacher_feature(p), self.sizes[str(k)]))
                         for k, p in enumerate(self.pairs)]
                return {"attention": torch.stack(terms).sum()}
            out: dict[str, torch.Tensor] = {}
            for g, (s_path, pairs) in enumerate(self._groups().items()):
                block, size = self.adapters[f"group{g}"], self.sizes[str(g)]
                fs = _pool(self._student_feature(s_path), size)
                fts = [_pool(self._teacher_feature(p), size) for p in pairs]
                terms = self._cfl(block, fs, fts) if self.method == "cfl" else self._layerwise(block, fs, fts)
                for k, v in terms.items():
                    out[k] = out[k] + v if k in out else v
            return out
        finally:
            self._clear()

    def _cfl(self, block, fs, fts) -> dict[str, torch.Tensor]:
        hs = F.normalize(block["enc_s"](fs).flatten(1), dim=1)
        mmd_sum, recon_sum = fs.new_zeros(()), fs.new_zeros(())
        for enc, dec, ft in zip(block["enc_t"], block["dec_t"], fts):
            ht = enc(ft)
            mmd_sum = mmd_sum + mmd(hs, F.normalize(ht.flatten(1), dim=1), self.sigmas)
            recon_sum = recon_sum + F.mse_loss(dec(ht), ft)
        return {"cfl_mmd": mmd_sum, "cfl_recon": recon_sum}

    def _layerwise(self, block, fs, fts) -> dict[str, torch.Tensor]:
        cat = torch.cat(fts, dim=1)
        code = block["enc"](cat)
        return {"ae_recon": F.mse_loss(block["dec"](code), cat),
                "ae_align": F.mse_loss(block["align"](fs), code.detach())}

    # -- housekeeping ------------------------------------------------------------------------
    def _clear(self) -> None:
        self.student_tap.clear()
        for tap in self.teacher_taps.values():
            tap.clear()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' parameters (empty for ``attention``)."""
        return self.adapters.parameters()

    def to(self, device) -> "FeatureAmalgamator":
        self.adapters.to(device)
        return self

    def train(self, mode: bool = True) -> "FeatureAmalgamator":
        self.adapters.train(mode)
        return self

    def state_dict(self) -> dict:
        return self.adapters.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adapters.load_state_dict(state)

    def close(self) -> None:
        self.student_tap.close()
        for tap in self.teacher_taps.values():
            tap.close()

    def describe(self) -> dict:
        return {"method": self.method, "layers": [str(p) for p in self.pairs]}
