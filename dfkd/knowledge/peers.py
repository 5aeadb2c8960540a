"""Deep mutual learning: a cohort of students that teach each other (``peers:`` in a run config).

Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning", CVPR 2018. A cohort of ``K`` networks
learns together; network ``k``'s loss is its own supervised loss plus the mean, over the other
networks, of the KL divergence from their predictions to its own (the paper's eq. 9):

    L_k = L_sup(k) + w / (K - 1) * sum_{l != k} KL(p_l || p_k),    p = softmax(z)  (T = 1)

with the peers' probabilities ``p_l`` taken as constants (detached), ``w = 1`` in the paper.
Here the supervised loss of a network is what the method teaches on its batch: the student
keeps the method's own terms (:meth:`~generators.base.Synthesizer.student_losses`, with any
``knowledge:`` terms when :class:`~dfkd.knowledge.terms.KnowledgeTerms` is inside), and each
peer learns the method's teacher target by KD at the method's temperature,
``T^2 KL(p_teacher^T || p_peer^T)`` (:func:`dfkd.core.losses.kd_loss`), on the same batch.

:class:`PeerCohort` wraps a synthesizer (:class:`~generators.wrapped.WrappedSynthesizer`), so it
works with every method, real or synthetic transfer sets and teacher ensembles alike. It holds
the ``K - 1`` peers (the student's architecture unless another is given, each initialised from
its own seed) as extra trainable parameters that the engine optimises with the student
(:meth:`extra_parameters`: the student's optimiser, learning rate and schedule). The student's
loss gains the term ``mutual``; peer ``j`` contributes ``peer{j}_kd`` and ``peer{j}_mutual``. The
terms of different networks depend on disjoint parameters (the others' probabilities are
detached), so one backward pass of their sum gives every network the gradient of its own
loss and all ``K`` take their step together from the same batch's predictions (the paper's
Algorithm 1 updates the networks in turn, recomputing the predictions between updates). The
peers' weights and BatchNorm statistics are saved with the synthesizer's state (``state.pt``,
``synthesizer.pt``), so a run resumes with them; :meth:`report` gives each peer's test accuracy
and the cohort's (mean of the ``K`` networks' probabilities) for ``summary.json``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.losses import kd_loss
from dfkd.engine.evaluation import model_logits
from generators.base import seeded
from generators.wrapped import WrappedSynthesizer
from teachers import build_model


class PeerError(ValueError):
    """A cohort that cannot be built as asked."""


def mutual_loss(logits: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """DML's mimicry term of one network: ``1/|others| sum_l KL(p_l || p)`` at temperature 1,
    averaged over the batch, the others' probabilities detached (module docstring)."""
    if not others:
        raise PeerError("the mutual term needs at least one other network")
    log_p = F.log_softmax(logits.float(), dim=1)
    terms = [F.kl_div(log_p, F.log_softmax(o.detach().float(), dim=1), reduction="batchmean", log_target=True)
             for o in others]
    return torch.stack(terms).mean()


class PeerCohort(WrappedSynthesizer):
    """``inner``'s synthesis; the student and ``n_peers`` peers learn mutually (module docstring).

    Args:
        inner: the method (possibly already wrapped).
        n_peers: peers besides the student (the cohort has ``n_peers + 1`` networks), at least 1.
        arch: the peers' architecture (a model name of :mod:`teachers`).
        mean, std: the input normalisation of the peers (the teacher's, as the student's).
        weight: ``w``, the weight of every network's mutual term (the paper's is 1).
        seed: the peers' initialisation (peer ``j`` from its own seed derived from it).
        channels_last: keep the peers channels-last (as the student with ``channels_last``).
    """

    def __init__(self, inner, n_peers: int, arch: str, mean, std, weight: float = 1.0, seed: int = 0,
                 channels_last: bool = False):
        super().__init__(inner)
        if int(n_peers) < 1:
            raise PeerError(f"a cohort needs at least one peer besides the student, got {n_peers}; use peers >= 2")
        if weight < 0:
            raise PeerError(f"peer_weight must be 0 or more, got {weight}")
        self.arch, self.weight = str(arch), float(weight)
        channels, height, _ = self.image_shape
        peers = []
        for j in range(1, int(n_peers) + 1):
            with seeded(int(seed) * 7919 + 104729 * j):  # each peer its own initial weights
                peer = build_model(self.arch, self.num_classes, channels, height, mean, std)
            if channels_last:
                peer = peer.to(memory_format=torch.channels_last)
            peers.append(peer.to(self.device))
        self.peers = nn.ModuleList(peers)

    @property
    def names(self) -> list[str]:
        return [f"peer{j}" for j in range(1, len(self.peers) + 1)]

    def describe(self) -> dict:
        return dict(self.inner.describe(), peers={"count": len(self.peers), "arch": self.arch, "weight": self.weight})

    def extra_parameters(self) -> list[nn.Parameter]:
        return [*self.inner.extra_parameters(), *self.peers.parameters()]

    def student_losses(self, student, batch):
        """The method's terms for the student plus ``mutual``; each peer's KD and mutual terms."""
        losses, student_logits, teacher_logits = self.inner.student_losses(student, batch)
        losses = dict(losses)
        names = self.names
        clash = sorted(set(losses) & {"mutual", *(f"{n}_{t}" for n in names for t in ("kd", "mutual"))})
        if clash:
            raise PeerError(f"the method already has a loss term named {clash[0]!r}")
        peer_logits = []
        with self.inner.autocast():
            for peer in self.peers:
                peer.train(student.training)
                peer_logits.append(peer(batch.images).float())
        cohort = [student_logits, *peer_logits]
        losses["mutual"] = self.weight * mutual_loss(student_logits, peer_logits)
        for j, (name, logits) in enumerate(zip(names, peer_logits), start=1):
            losses[f"{name}_kd"] = kd_loss(logits, teacher_logits.detach(), self.temperature)
            losses[f"{name}_mutual"] = self.weight * mutual_loss(logits, cohort[:j] + cohort[j + 1:])
        return losses, student_logits, teacher_logits

    def report(self, images, labels: torch.Tensor, device, student: nn.Module) -> dict:
        """Each peer's accuracy on ``images`` (a tensor or a data set) and the cohort's (the mean of
        the ``K`` networks' probabilities, the student's included): the ``peers`` and
        ``cohort_accuracy`` of ``summary.json``."""
        rows, probs = [], [model_logits(student, images, device).float().softmax(1)]
        for name, peer in zip(self.names, self.peers):
            logits = model_logits(peer, images, device).float()
            probs.append(logits.softmax(1))
            rows.append({"name": name, "arch": self.arch, "accuracy": float((logits.argmax(1) == labels).float().mean())})
        cohort = torch.stack(probs).mean(0).argmax(1)
        return {"peers": rows, "cohort_accuracy": float((cohort == labels).float().mean())}

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "peers": [p.state_dict() for p in self.peers]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        saved = state["peers"]
        if len(saved) != len(self.peers):
            raise PeerError(f"the saved state has {len(saved)} peers, this run {len(self.peers)}")
        for peer, weights in zip(self.peers, saved):
            peer.load_state_dict(weights)
