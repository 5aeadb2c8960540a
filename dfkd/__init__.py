"""dfkd: data-free and multi-teacher knowledge distillation.

The Python API (the command line ``dfkd`` is a thin layer over it)::

    import dfkd
    teacher = dfkd.train_teacher(dataset="digits", arch="lenet5_bn", epochs=5, out="runs/t.pt")
    run = dfkd.distill(teacher=teacher.path, method="fast", steps=300, out="runs/fast")
    print(run.student_accuracy)

The layers, from the bottom: ``teachers`` (the model zoo; imports nothing of ours),
:mod:`dfkd.core` (feature taps, BatchNorm hooks, losses, device and option rules),
``generators`` (the synthesizers), then :mod:`dfkd.data`, :mod:`dfkd.multi` (teacher
ensembles and amalgamation), :mod:`dfkd.engine` (the distillation loop),
:mod:`dfkd.reporting` (metrics, plots, reports), :mod:`dfkd.api` and :mod:`dfkd.cli`.
"""

__version__ = "0.1.0"

_API = ("AmalgamateConfig", "BornAgainResult", "DistillConfig", "RunError", "RunResult", "TeacherConfig",
        "TeacherResult", "amalgamate", "born_again", "distill", "train_teacher")
__all__ = list(_API)


def __getattr__(name):
    # The API is imported on first use: ``generators`` imports ``dfkd.core``, which must not
    # pull the layers above it in.
    if name in _API:
        from dfkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")
