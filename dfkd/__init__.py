"""dfkd: data-free and multi-teacher knowledge distillation.

Core pieces: :mod:`dfkd.data` (data sets), :mod:`dfkd.losses` (loss terms), :mod:`dfkd.hooks`
(features by module path, BatchNorm statistics), :mod:`dfkd.engine` (the distillation loop),
:mod:`dfkd.ensemble` / :mod:`dfkd.combine` / :mod:`dfkd.amalgamation` (teacher zoos),
:mod:`dfkd.quality` / :mod:`dfkd.plots` / :mod:`dfkd.report` (what happened) and
:mod:`dfkd.cli` (the ``dfkd`` command). Synthesizers live in the ``generators`` package and
the model zoo in ``teachers``.
"""

__version__ = "0.1.0"
