"""Session-8 diagnostic: how well a Fast run's student fits its own memory bank (argmax agreement
with the teacher on the bank images), the teacher's confidence there and its class histogram.
Usage (repo root): PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/bank_fit.py RUN_DIR"""
import sys, torch
from teachers.checkpoint import load_checkpoint
torch.set_num_threads(1)
run = sys.argv[1]
bank = torch.load(f"{run}/synthesizer.pt", weights_only=False, map_location="cpu")["state"]["pool"]["images"]
T, _ = load_checkpoint("benchmarks/teachers/fm_lenet5_bn_seed0.pt"); S, _ = load_checkpoint(f"{run}/student.pt")
T.eval(); S.eval()
with torch.no_grad():
    t = torch.cat([T(bank[i:i+4096]) for i in range(0, len(bank), 4096)])
    s = torch.cat([S(bank[i:i+4096]) for i in range(0, len(bank), 4096)])
agree = (t.argmax(1) == s.argmax(1)).float()
print("bank", len(bank), "agreement all %.2f last10k %.2f first10k %.2f" % (agree.mean()*100, agree[-10000:].mean()*100, agree[:10000].mean()*100))
print("teacher conf %.3f" % t.softmax(1).max(1).values.mean())
print("class hist", torch.bincount(t.argmax(1), minlength=10).tolist())
