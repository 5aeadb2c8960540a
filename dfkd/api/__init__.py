"""The Python API: one function per job, each taking a config object (or its keys as
keywords) and returning a result object. The command line is a thin layer over it."""
from dfkd.api.amalgamate import amalgamate
from dfkd.api.born_again import BornAgainResult, born_again
from dfkd.api.config import AmalgamateConfig, DistillConfig, TeacherConfig
from dfkd.api.distill import distill
from dfkd.api.results import RunError, RunResult
from dfkd.api.synthesize import synthesize
from dfkd.api.teacher import TeacherResult, train_teacher

__all__ = ["AmalgamateConfig", "BornAgainResult", "DistillConfig", "RunError", "RunResult", "TeacherConfig", "TeacherResult",
           "amalgamate", "born_again", "distill", "synthesize", "train_teacher"]
