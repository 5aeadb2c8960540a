"""Session-8 diagnostic: pixel statistics of a Fast run's bank against 20,000 real training images,
overall and per teacher-predicted class (mean brightness, share of pixels over 0.5, the teacher's
mean confidence). Usage (repo root): PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/bank_stats.py RUN_DIR"""
import sys

import torch

from common import TEACHER, load_bank, load_model
from dfkd.analysis import model_logits
from dfkd.data import load_dataset

torch.set_num_threads(1)
bank = load_bank(sys.argv[1])
real = load_dataset("fashion-mnist", split="train").images[:20000]
teacher = load_model(TEACHER)
for name, x in (("bank", bank), ("real", real)):
    lg = model_logits(teacher, x, "cpu"); c = lg.argmax(1); conf = lg.softmax(1).max(1).values
    print(name, "mean %.3f std %.3f zero-ish(<0.05) %.2f bright(>0.5) %.2f" % (x.mean(), x.std(), (x < 0.05).float().mean(), (x > 0.5).float().mean()))
    print("  per-class mean brightness:", " ".join("%.2f" % x[c == k].mean() for k in range(10)))
    print("  per-class bright fraction:", " ".join("%.2f" % (x[c == k] > 0.5).float().mean() for k in range(10)))
    print("  per-class mean conf      :", " ".join("%.2f" % conf[c == k].mean() for k in range(10)))
