"""Session-8 diagnostic: student-teacher agreement on the real Fashion-MNIST *training* images
(``--split test``: the test images, as run reports show them since session 8; for runs older than
that section), split by the teacher's confidence (>= 0.9 or not), with the most frequent (teacher
class -> student class) misses among the sure ones (:func:`dfkd.quality.sure_teacher_agreement`).
Usage (repo root):
PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/train_fit.py [--split test] STUDENT_CHECKPOINT..."""
import argparse

import torch

from common import TEACHER, load_model
from dfkd.analysis import model_logits, predict_labels
from dfkd.data import load_dataset
from dfkd.quality import sure_teacher_agreement

torch.set_num_threads(1)
parser = argparse.ArgumentParser(description="student-teacher agreement where the teacher is sure")
parser.add_argument("--split", choices=["train", "test"], default="train", help="real images to compare on")
parser.add_argument("students", nargs="+", metavar="STUDENT_CHECKPOINT")
args = parser.parse_args()
images = load_dataset("fashion-mnist", split=args.split).images
teacher_logits = model_logits(load_model(TEACHER), images, "cpu")
for path in args.students:
    result = sure_teacher_agreement(teacher_logits, predict_labels(load_model(path), images, "cpu"), top=6)
    print(f"{path}: sure {result['sure_fraction']:.1%}, agreement there {result['sure_agreement']:.2%}, "
          f"on the rest {result['unsure_agreement']:.2%}")
    print("  misses (teacher -> student: count of sure):",
          ", ".join(f"{m['teacher']}->{m['student']}: {m['count']} of {m['of']}" for m in result["misses"]))
