"""Contrastive knowledge: CRD, a lower bound on the mutual information of the two embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.knowledge.registry import Knowledge, flat, pairs, register_knowledge

__all__ = ["CRD", "nce_loss"]


def nce_loss(positive: torch.Tensor, negative: torch.Tensor, num_negatives: int, z: torch.Tensor,
             eps: float = 1e-7, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CRD's NCE objective for one side (Tian et al., ICLR 2020, eq. 18).

    ``positive``: ``(B,)`` scores ``e = exp(v . w / tau)`` of the matching pairs; ``negative``:
    ``(B, K)`` scores of the non-matching pairs (``negative_mask`` marks which of them count).
    With the critic ``h(e) = e / (e + N Z)``, ``N = num_negatives``:

    ``L = -1/B [ sum_i log h(e_i^+) + sum_{i,k} log(1 - h(e_ik^-)) ]``.

    ``Z`` is the normalising constant of ``exp(v . w / tau)``; the official code's
    ``P = e / Z_data`` with noise ``1 / n_data`` gives exactly this ``h`` with
    ``Z = Z_data / n_data``, the mean score of the first batch, so the data-set size cancels."""
    nz = num_negatives * z
    log_pos = torch.log(positive / (positive + nz + eps))
    log_neg = torch.log(nz / (negative + nz + eps))
    if negative_mask is not None:
        log_neg = log_neg * negative_mask
    return -(log_pos.sum() + log_neg.sum()) / positive.shape[0]


@register_knowledge("crd")
class CRD(Knowledge):
    """Contrastive representation distillation, Tian, Krishnan & Isola, ICLR 2020,
    arXiv:1910.10699.

    Each network's embedding goes through its own linear head to ``feat_dim`` dimensions and
    is l2-normalised (``v_S``, ``v_T``). A pair scores ``e = exp(v_S . v_T / tau)``; matching
    pairs (same input) are positives, other pairs negatives, and the loss is the NCE bound
    of :func:`nce_loss` taken twice, with the student and with the teacher as anchor
    (``L = L_S + L_T``), for one pair of embeddings (the penultimate features). Defaults of
    the official code: ``feat_dim = 128``, ``tau = 0.07``, ``num_negatives = 16384``; weight
    0.8 in its CIFAR-100 benchmark. The heads are built from ``student_dim``/``teacher_dim`` when given,
    else from the first batch, and are trained with the student (:meth:`extra_parameters`).

    Where this differs from the official code, and why (data-free samples are new at every
    step, so there are no data-set indices to key a memory on):

    - **positives** are the other network's embedding of the same input in the current
      batch (the paper's joint pairs), not a momentum-averaged memory slot of its index;
    - ``negatives="memory"`` (default): each network keeps a FIFO queue of its last
      ``memory_size`` embeddings (default ``num_negatives``; started with random unit
      vectors, as the official memory starts random; updated only in training mode, without
      gradient). With ``memory_size == num_negatives`` every anchor uses the whole queue;
      with a larger queue each anchor draws ``num_negatives`` entries uniformly (with
      replacement, like the official sampler; ``generator=`` in ``forward`` seeds it and
      must live on the memory's device);
    - ``negatives="batch"``: no memory; each anchor's negatives are the other network's
      embeddings of the other ``B - 1`` inputs (works for any batch of two or more; the
      bound is looser with few negatives);
    - ``Z`` is fixed on the first training batch, as in the official code, but kept as a
      buffer without a host sync.
    """

    layers = "embedding"
    suggested_weight = 0.8

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, feat_dim: int = 128,
                 temperature: float = 0.07, negatives: str = "memory", num_negatives: int = 16384,
                 memory_size: int | None = None, eps: float = 1e-7):
        super().__init__()
        if negatives not in ("memory", "batch"):
            raise ValueError(f"crd: negatives must be 'memory' or 'batch', not {negatives!r}")
        self.feat_dim, self.temperature, self.negatives, self.eps = int(feat_dim), float(temperature), negatives, eps
        self.num_negatives = int(num_negatives)
        self.memory_size = int(memory_size or num_negatives)
        if negatives == "memory" and not 1 <= self.num_negatives <= self.memory_size:
            raise ValueError(f"crd: need 1 <= num_negatives <= memory_size, got {self.num_negatives} and {self.memory_size}")
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        if student_dim is not None and teacher_dim is not None:
            self._build(int(student_dim), int(teacher_dim))
        else:
            self._pending = True
        if negatives == "memory":
            self.register_buffer("memory_s", F.normalize(torch.randn(self.memory_size, self.feat_dim), dim=1))
            self.register_buffer("memory_t", F.normalize(torch.randn(self.memory_size, self.feat_dim), dim=1))
        self.register_buffer("nce_z", torch.zeros(2))
        self._ptr, self._z_ready = 0, False

    def _build(self, ds: int, dt: int, device=None) -> None:
        self.embed_s = nn.Linear(ds, self.feat_dim).to(device)
        self.embed_t = nn.Linear(dt, self.feat_dim).to(device)
        self._pending = False

    def get_extra_state(self):
        return {"ptr": self._ptr, "z_ready": self._z_ready}

    def set_extra_state(self, state):
        self._ptr, self._z_ready = int(state["ptr"]), bool(state["z_ready"])

    def embed(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_S, v_T)``: both embeddings through their heads, l2-normalised."""
        s, t = flat(student), flat(teacher)
        if self._pending:
            self._build(s.shape[1], t.shape[1], s.device)
        return F.normalize(self.embed_s(s), dim=1), F.normalize(self.embed_t(t), dim=1)

    def _z(self, side: int, scores: torch.Tensor) -> torch.Tensor:
        if self._z_ready:
            return self.nce_z[side]
        z = scores.detach().mean()
        self.nce_z[side] = z
        return z

    def _enqueue(self, name: str, v: torch.Tensor) -> None:
        n = min(v.shape[0], self.memory_size)
        idx = (self._ptr + torch.arange(n, device=v.device)) % self.memory_size
        # out of place: this step's graph still holds the old queue
        setattr(self, name, getattr(self, name).index_copy(0, idx, v[-n:].detach().to(getattr(self, name).dtype)))

    def _negatives(self, memory: torch.Tensor, batch: int, generator) -> torch.Tensor:
        if self.num_negatives == self.memory_size:
            return memory.unsqueeze(0).expand(batch, -1, -1)
        idx = torch.randint(self.memory_size, (batch, self.num_negatives), device=memory.device, generator=generator)
        return memory[idx]

    def _one_pair(self, student, teacher, generator) -> torch.Tensor:
        vs, vt = self.embed(student, teacher)
        b, tau = vs.shape[0], self.temperature
        if self.negatives == "batch":
            if b < 2:
                raise ValueError("crd: in-batch negatives need at least two samples per batch")
            e = torch.exp(vs @ vt.t() / tau)
            off = 1.0 - torch.eye(b, device=e.device, dtype=e.dtype)
            z = self._z(0, e)
            self._z(1, e)
            pos = torch.diagonal(e)
            loss = (nce_loss(pos, e, b - 1, z, self.eps, off) + nce_loss(pos, e.t(), b - 1, z, self.eps, off))
        else:
            pos = torch.exp((vs * vt).sum(dim=1) / tau)
            neg_s = torch.exp(torch.bmm(self._negatives(self.memory_t, b, generator), vs[:, :, None])[..., 0] / tau)
            neg_t = torch.exp(torch.bmm(self._negatives(self.memory_s, b, generator), vt[:, :, None])[..., 0] / tau)
            z_s = self._z(0, torch.cat([pos[:, None], neg_s], dim=1))
            z_t = self._z(1, torch.cat([pos[:, None], neg_t], dim=1))
            loss = (nce_loss(pos, neg_s, self.num_negatives, z_s, self.eps)
                    + nce_loss(pos, neg_t, self.num_negatives, z_t, self.eps))
            if self.training:
                self._enqueue("memory_s", vs)
                self._enqueue("memory_t", vt)
                self._ptr = (self._ptr + min(b, self.memory_size)) % self.memory_size
        if self.training:
            self._z_ready = True
        return loss

    def forward(self, student_feats, teacher_feats, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
        pair = pairs(self.name, student_feats, teacher_feats)
        if len(pair) != 1:
            raise ValueError(f"crd: takes one (student, teacher) embedding pair, got {len(pair)}")
        return self._one_pair(*pair[0], generator)
