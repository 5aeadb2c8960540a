"""Session-8 diagnostic: how well a Fast run's student fits its own memory bank (argmax agreement
with the teacher on the bank images), the teacher's confidence there and its class histogram.
Usage (repo root): PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/bank_fit.py RUN_DIR"""
import sys

import torch

from common import TEACHER, load_bank, load_model
from dfkd.analysis import model_logits

torch.set_num_threads(1)
run = sys.argv[1]
bank = load_bank(run)
t = model_logits(load_model(TEACHER), bank, "cpu")
s = model_logits(load_model(f"{run}/student.pt"), bank, "cpu")
agree = (t.argmax(1) == s.argmax(1)).float()
print("bank", len(bank), "agreement all %.2f last10k %.2f first10k %.2f" % (agree.mean()*100, agree[-10000:].mean()*100, agree[:10000].mean()*100))
print("teacher conf %.3f" % t.softmax(1).max(1).values.mean())
print("class hist", torch.bincount(t.argmax(1), minlength=10).tolist())
