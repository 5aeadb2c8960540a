"""A short data-free run per method on digits reaches a stated accuracy well above chance (10%).

The thresholds were set from measured runs with a margin (see the comments; measure again with
``benchmarks/digits_margins.py``); the runs are small so the whole file stays within a few
minutes on 2 CPU cores.
"""
import pytest
import torch

from dfkd.data import load_dataset
from dfkd.engine.evaluation import EvalData
from dfkd.engine.optim import StudentOptim
from dfkd.engine.run import DistillationRun, RunOptions
from generators import create_synthesizer
from generators.base import STUDENT_RUN_KEYS
from teachers import build_model, freeze, train_classifier

pytestmark = pytest.mark.slow


def train_digits_teacher():
    """The digits lenet5_bn teacher of these tests: (frozen teacher, test split, data info, its test accuracy)."""
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    info = train.info
    model = build_model("lenet5_bn", 10, 1, 32, info.mean, info.std)
    result = train_classifier(model, train.images, train.labels, test.images, test.labels, epochs=12, batch_size=64,
                              seed=0, progress=False)
    return freeze(model), test, info, result["test_accuracy"]


@pytest.fixture(scope="module")
def digits_teacher():
    teacher, test, info, accuracy = train_digits_teacher()
    assert accuracy > 0.9
    return teacher, test, info


# method -> (options, student steps, minimum final accuracy)
CASES = {
    "dafl": ({"batch_size": 64, "ngf": 8, "generator_lr": 0.02}, 300, 0.40),  # seeds 0-3: 0.74/0.69/0.73/0.71
    # bn_weight 10 is the paper's; with 1 (and lr 0.25) seeds 0-3 gave 0.41/0.66/0.66/0.64 here and
    # 0.17 on the CI machine. With 10: 0.77/0.80/0.82/0.77 (seeds 0-3), 0.81/0.76/0.82/0.81 (seeds 4-7).
    "deepinversion": ({"iterations": 60, "lr": 0.1, "bn_weight": 10.0, "synthesis_batch_size": 128,
                       "student_steps_per_round": 40, "batch_size": 128, "student_lr": 0.05}, 400, 0.50),
    # seeds 0-7 with the official code's shared batch per iteration, KL / K and gradient clipping:
    # 0.28/0.31/0.34/0.28/0.34/0.42/0.35/0.32
    "zskt": ({"batch_size": 64, "ngf": 16}, 300, 0.20),
    # DFAD has no diversity term: its first generator batches are mostly one class to this teacher and the
    # student can sit on that class (10%) for a while. At 300 steps seeds 0-3 gave 0.34/0.11/0.29/0.10 (a
    # coin flip); at 1000 steps seeds 0-7 gave 0.17/0.17/0.19/0.23/0.24/0.26/0.26/0.21.
    "dfad": ({"batch_size": 64, "ngf": 16, "student_lr": 0.05}, 1000, 0.14),
    "fast": ({"ngf": 8, "synthesis_batch_size": 128, "batch_size": 128, "student_steps_per_round": 10,
              "temperature": 1.0, "student_lr": 0.05, "warmup_rounds": 5}, 300, 0.60),  # measured 0.93
}


def run_case(method, teacher, test, info, run_dir, seed=0) -> dict:
    """One CASES run (student and synthesizer seeded with ``seed``); returns the run's summary."""
    options, steps, _ = CASES[method]
    torch.manual_seed(seed)
    student = build_model("lenet5_half", 10, 1, 32, info.mean, info.std)
    run_settings = {k: v for k, v in options.items() if k in STUDENT_RUN_KEYS}
    method_options = {k: v for k, v in options.items() if k not in STUDENT_RUN_KEYS}
    synth = create_synthesizer(method, teacher, image_shape=(1, 32, 32), num_classes=10, seed=seed, **method_options)
    optim = StudentOptim.resolve(synth.student_recipe, run_settings)
    run = DistillationRun(teacher, student, synth, run_dir, RunOptions(steps=steps, progress=False, student_optim=optim),
                          eval_data=EvalData(test.images, test.labels),
                          student_meta={"dataset": "digits", "classes": list(range(10)), "class_names": info.class_names,
                                        "mean": list(info.mean), "std": list(info.std), "image_shape": [1, 32, 32], "seed": seed})
    return run.run()


@pytest.mark.parametrize("method", list(CASES))
def test_short_digits_run_beats_chance(method, digits_teacher, tmp_path):
    teacher, test, info = digits_teacher
    summary = run_case(method, teacher, test, info, tmp_path)
    print(method, summary["student_accuracy"], summary["wall_seconds"])
    assert summary["student_accuracy"] > CASES[method][2]
