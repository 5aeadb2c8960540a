"""Activation records (Lopes, Fenu & Starner, "Data-Free Knowledge Distillation for Deep
Neural Networks", 2017, arXiv:1710.07535): per-class statistics of a teacher's activations,
recorded while its training data is at hand (:func:`record_activations`, stored in the teacher
checkpoint's meta under :data:`RECORDS_KEY`), the target activations sampled from them and the
loss that matches a reconstruction to them. :mod:`generators.lopes` reconstructs inputs with them.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.taps import FeatureTap, block_paths, inner_network
from generators.base import SynthesizerOptionError

#: the teacher checkpoint's meta key that holds the records
RECORDS_KEY = "activation_records"
RECORDS_FORMAT = "lopes-activation-records/1"
#: the name of the top layer's record (the teacher's logits divided by the records' temperature)
TOP = "logits"
#: the official code's distillation temperature: its statistics, reconstructions and student all use logits / 8
RECORD_TEMPERATURE = 8.0
#: layers with more units keep per-unit standard deviations only (no covariance matrix)
MAX_COVARIANCE_UNITS = 1024

NO_RECORDS = ("lopes: the teacher has no activation records; they must be recorded while its training data is at "
              "hand, with `dfkd train-teacher --record-metadata`")


# --------------------------------------------------------------------------- recording
def hidden_layers(model: nn.Module) -> list[tuple[str, str]]:
    """The hidden layers whose activations are recorded, bottom to top, as ``(path, capture)``:
    the input of every ``nn.ReLU`` module the forward pass calls exactly once (the
    pre-activation of a conv or fc layer, after its BatchNorm when it has one, as the official
    code records ``conv1``, ``conv2``, ``fc1``, ``fc2`` before their ReLUs; an in-place ReLU's
    input is read after it ran, i.e. rectified). A network without ``nn.ReLU`` modules gets the
    outputs of its ``block_paths`` instead."""
    net = inner_network(model)
    relus = [(path, "input") for path, m in net.named_modules() if isinstance(m, nn.ReLU) and path]
    if relus:
        return relus
    return [(path, "output") for path in block_paths(model)]


def _probe(model: nn.Module, layers: list[tuple[str, str]], image: torch.Tensor) -> list[tuple[str, str, list[int]]]:
    """``layers`` that one forward pass calls exactly once, with their activation shapes."""
    net = inner_network(model)
    modules = dict(net.named_modules())
    calls: dict[str, list[torch.Tensor]] = {path: [] for path, _ in layers}
    handles = []
    for path, capture in layers:
        if capture == "input":
            handles.append(modules[path].register_forward_pre_hook(lambda m, i, p=path: calls[p].append(i[0])))
        else:
            handles.append(modules[path].register_forward_hook(lambda m, i, o, p=path: calls[p].append(o)))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return [(path, capture, list(calls[path][0].shape[1:])) for path, capture in layers if len(calls[path]) == 1]


class _Moments:
    """Per-class running sums of one layer's flattened activations (float64)."""

    def __init__(self, classes: int, units: int, covariance: bool):
        self.sum = torch.zeros(classes, units, dtype=torch.float64)
        self.squares = torch.zeros(classes, units, dtype=torch.float64)
        self.outer = torch.zeros(classes, units, units, dtype=torch.float64) if covariance else None

    def add(self, acts: torch.Tensor, onehot: torch.Tensor) -> None:
        acts = acts.detach().flatten(1).double().cpu()
        self.sum += onehot.T @ acts
        self.squares += onehot.T @ acts.square()
        if self.outer is not None:
            for c in onehot.sum(0).nonzero().flatten().tolist():
                rows = acts[onehot[:, c] > 0]
                self.outer[c] += rows.T @ rows

    def finish(self, counts: torch.Tensor) -> dict:
        n = counts.double().clamp_min(1).view(-1, 1)
        mean = self.sum / n
        std = (self.squares / n - mean.square()).clamp_min(0).sqrt()
        out = {"mean": mean.float(), "std": std.float(), "cov": None}
        if self.outer is not None:
            cov = self.outer / n.view(-1, 1, 1) - mean.unsqueeze(2) * mean.unsqueeze(1)
            out["cov"] = (0.5 * (cov + cov.transpose(1, 2))).float()
        return out


def record_activations(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                       temperature: float = RECORD_TEMPERATURE, all_layers: bool = True,
                       max_covariance_units: int = MAX_COVARIANCE_UNITS, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> dict:
    """The activation records ("metadata", paper Sec. 3) of a trained ``model`` on its
    training ``images`` (``[0,1]``, ``N x C x H x W``) with their ``labels``.

    For each recorded layer ``l`` (bottom to top; the top layer, named :data:`TOP`, is the
    logits divided by ``temperature``, as the official ``compute_stats`` records the
    temperature-8 outputs) and each class ``c`` with images ``x_1..x_n``, on the flattened
    activations ``a_i = a^l(x_i)``::

        mean_c = 1/n sum_i a_i
        std_c  = sqrt(1/n sum_i a_i^2 - mean_c^2)                          (per unit)
        cov_c  = 1/n sum_i (a_i - mean_c)(a_i - mean_c)^T                  (population, as C/n in the official code)

    ``cov`` is kept only for layers of at most ``max_covariance_units`` units (the top layer
    always has it); larger layers keep ``std`` only and are sampled element-wise, the official
    sampler's fallback for layers without a covariance matrix. Hidden layers
    (:func:`hidden_layers`) are recorded when ``all_layers``.

    Returns a plain dict (storable in checkpoint meta)::

        {"format": RECORDS_FORMAT, "temperature": T, "counts": [n_c per class],
         "layers": [{"path", "capture", "shape", "mean": C x D, "std": C x D, "cov": C x D x D | None}, ...]}
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"record_activations: {images.shape[0]} images but {labels.shape[0]} labels")
    was_training = model.training
    model.eval()
    try:
        layers = _probe(model, hidden_layers(model), images[:1].to(device)) if all_layers else []
        units = [math.prod(shape) for _, _, shape in layers] + [num_classes]
        moments = [_Moments(num_classes, d, covariance=(d <= max_covariance_units or k == len(units) - 1))
                   for k, d in enumerate(units)]
        counts = torch.zeros(num_classes, dtype=torch.float64)
        with FeatureTap(model, [p for p, c, _ in layers if c == "input"], capture="input") as tap_in, \
                FeatureTap(model, [p for p, c, _ in layers if c == "output"], capture="output") as tap_out, \
                torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                y = labels[start:start + batch_size].long().cpu()
                onehot = F.one_hot(y, num_classes).double()
                logits = model(x).float()
                acts = [(tap_in if c == "input" else tap_out)[p] for p, c, _ in layers] + [logits / temperature]
                for m, a in zip(moments, acts):
                    m.add(a, onehot)
                counts += onehot.sum(0)
    finally:
        model.train(was_training)
    records = []
    for (path, capture, shape), m in zip([*layers, (TOP, "output", [num_classes])], moments):
        records.append({"path": path, "capture": capture, "shape": list(shape), **m.finish(counts)})
    return {"format": RECORDS_FORMAT, "temperature": float(temperature),
            "counts": [int(c) for c in counts.tolist()], "layers": records}


# --------------------------------------------------------------------------- sampling and loss
SAMPLINGS = ("official", "gaussian", "diagonal")


def _covariance_root(cov: torch.Tensor) -> torch.Tensor:
    """``A`` with ``A A^T = cov``: its Cholesky factor (with a jitter of 1e-6 of the mean variance
    on the diagonal), or, for a singular ``cov``, its symmetric square root with negative
    round-off eigenvalues set to 0."""
    cov = cov.double()
    jitter = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    root, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
    if int(info) == 0:
        return root.float()
    values, vectors = torch.linalg.eigh(cov)
    return (vectors * values.clamp_min(0).sqrt()).float()


def sample_targets(layer: Mapping, cls: int, n: int, sampling: str = "official",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` target activations (``n x D``) of class ``cls`` from one layer's record, with
    ``z ~ N(0, I)`` (``n x D``):

    - ``"official"`` (the official ``sample_from_stats``): ``h = mean_c + z cov_c``, a
      product with the covariance matrix itself, so ``h ~ N(mean_c, cov_c^2)``;
    - ``"gaussian"``: ``h = mean_c + z A^T`` with ``A A^T = cov_c``, so ``h ~ N(mean_c, cov_c)``;
    - ``"diagonal"``: ``h = mean_c + z * std_c`` (per unit);

    layers recorded without a covariance matrix are sampled element-wise
    (``mean_c + z * std_c``) by every mode, as the official sampler does for them."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    mean = layer["mean"][cls].float()
    z = torch.randn((n, mean.numel()), generator=generator)
    cov = layer.get("cov")
    if sampling == "diagonal" or cov is None:
        return mean + z * layer["std"][cls].float()
    cov = cov[cls].float()
    if sampling == "official":
        return mean + z @ cov
    return mean + z @ _covariance_root(cov).T


def matching_loss(activations: list[torch.Tensor], targets: list[torch.Tensor], normalise: bool) -> torch.Tensor:
    """The reconstruction loss (official ``_optimization_objectives.py``) on flattened
    activations ``a^l`` (``n x D_l``) and sampled targets ``h^l``::

        top layer  (one layer):  L = mean_{i,u} (relu(h_iu) - relu(a_iu))^2
        all layers (normalise):  L = sum_l 1/D_l * mean_{i,u} (relu(h^l_iu) - relu(a^l_iu))^2

    (``mean`` over the batch and the layer's ``D_l`` units, so each layer's term is divided by
    ``D_l`` twice, as the official ``(1.0 / size) * tf.reduce_mean(...)``)."""
    total = activations[0].new_zeros(())
    for a, h in zip(activations, targets):
        a, h = a.flatten(1).float(), h.flatten(1).to(a.device, torch.float32)
        term = (F.relu(h) - F.relu(a)).square().mean()
        total = total + (term / a.shape[1] if normalise else term)
    return total


def check_records(records, num_classes: int) -> dict:
    """``records`` as :func:`record_activations` writes them, or SynthesizerOptionError (one line)."""
    if records is None:
        raise SynthesizerOptionError(NO_RECORDS)
    if not isinstance(records, Mapping) or records.get("format") != RECORDS_FORMAT or not records.get("layers"):
        raise SynthesizerOptionError(f"lopes: the activation records are not in the {RECORDS_FORMAT} format; record them "
                                     "again with `dfkd train-teacher --record-metadata` while the data is at hand")
    top = records["layers"][-1]
    if top["path"] != TOP or tuple(top["mean"].shape) != (num_classes, num_classes):
        raise SynthesizerOptionError(f"lopes: the activation records are of a teacher with {top['mean'].shape[-1]} "
                                     f"outputs, not {num_classes}; they belong to another model")
    return dict(records)
