"""Session-8 diagnostic: student-teacher agreement on the real Fashion-MNIST training images, split
by the teacher's confidence (over 0.9 or not), with the confident misses per class and the most
frequent (teacher class -> student class) pairs. Usage (repo root):
PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/train_fit.py STUDENT_CHECKPOINT..."""
import sys, torch
from dfkd.data import load_dataset
from teachers.checkpoint import load_checkpoint
torch.set_num_threads(1)
X = load_dataset("fashion-mnist", split="train").images
T, _ = load_checkpoint("benchmarks/teachers/fm_lenet5_bn_seed0.pt"); T.eval()
with torch.no_grad():
    t = torch.cat([T(X[i:i+4096]) for i in range(0, len(X), 4096)])
for path in sys.argv[1:]:
    S, _ = load_checkpoint(path); S.eval()
    with torch.no_grad():
        s = torch.cat([S(X[i:i+4096]) for i in range(0, len(X), 4096)])
    conf = t.softmax(1).max(1).values
    agree = (t.argmax(1) == s.argmax(1)).float()
    hi = conf > 0.9
    print(path, "train agreement %.2f; on teacher-confident (>0.9, %.0f%%) %.2f; on the rest %.2f" % (agree.mean()*100, hi.float().mean()*100, agree[hi].mean()*100, agree[~hi].mean()*100))
    miss = (agree == 0) & hi
    tc = t.argmax(1); sc = s.argmax(1)
    print("  confident misses by teacher class:", torch.bincount(tc[miss], minlength=10).tolist(), "of", torch.bincount(tc[hi], minlength=10).tolist())
    pairs = torch.bincount(tc[miss] * 10 + sc[miss], minlength=100).view(10, 10)
    top = torch.topk(pairs.flatten(), 6)
    print("  top (teacher->student) pairs:", [(int(i)//10, int(i)%10, int(v)) for v, i in zip(top.values, top.indices)])
