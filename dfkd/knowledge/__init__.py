"""Student-side forms of knowledge: one registry of distillation losses, each faithful to its
paper (formula, reference and defaults in its docstring).

    from dfkd.knowledge import create_knowledge, list_knowledge
    loss = create_knowledge("rkd")                    # distance 25, angle 50
    value = loss([student_embedding], [teacher_embedding])
    optimizer = SGD([*student.parameters(), *loss.extra_parameters()], lr=0.05)

Families: relational (``rkd``, ``sp``, ``pkt``, ``cc``), feature (``fsp``, ``nst``, ``ft``,
``vid``), contrastive (``crd``), logit (``dkd``) and layer mapping between networks of
different depth (``pkd``, ``ckd``, ``alp_kd``, ``rail_kd``, with the mapping functions
:func:`pkd_layers`, :func:`ckd_groups`, :func:`alp_kd_weights`, :func:`rail_kd_layers`).
Each loss says what it needs (``needs``: ``"features"`` or ``"logits"``; ``layers``: see
:data:`LAYER_KINDS`). Contract details: :mod:`dfkd.knowledge.registry`.
"""
from dfkd.knowledge.contrastive import CRD
from dfkd.knowledge.feature import FSP, NST, VID, FactorTransfer
from dfkd.knowledge.logit import DKD
from dfkd.knowledge.mapping import (
    ALPKD,
    CKD,
    PKD,
    RAILKD,
    alp_kd_weights,
    ckd_groups,
    pkd_layers,
    rail_kd_layers,
)
from dfkd.knowledge.registry import (
    KNOWLEDGE,
    LAYER_KINDS,
    Knowledge,
    KnowledgeNotBuiltError,
    UnknownKnowledgeError,
    create_knowledge,
    knowledge_class,
    list_knowledge,
    register_knowledge,
)
from dfkd.knowledge.relational import CC, PKT, RKD, SP

__all__ = [
    "KNOWLEDGE", "LAYER_KINDS", "Knowledge", "KnowledgeNotBuiltError", "UnknownKnowledgeError", "create_knowledge",
    "knowledge_class", "list_knowledge", "register_knowledge",
    "RKD", "SP", "PKT", "CC", "FSP", "NST", "FactorTransfer", "VID", "CRD", "DKD", "PKD", "CKD", "ALPKD", "RAILKD",
    "pkd_layers", "ckd_groups", "alp_kd_weights", "rail_kd_layers",
]
