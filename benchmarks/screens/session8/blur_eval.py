"""Session-8 diagnostic: test accuracy of each given checkpoint on Fashion-MNIST test images
blurred with a 5x5 Gaussian of sigma 0 / 0.5 / 0.75 / 1. Usage (repo root):
PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/blur_eval.py CHECKPOINT..."""
import sys, torch
import torchvision.transforms.functional as TF
from dfkd.data import load_dataset
from teachers.checkpoint import load_checkpoint
torch.set_num_threads(1)
test = load_dataset("fashion-mnist", split="test")
X, y = test.images, test.labels
def acc(model, sigma):
    model.eval(); correct = 0
    with torch.no_grad():
        for i in range(0, len(X), 2000):
            x = X[i:i+2000]
            if sigma > 0:
                x = TF.gaussian_blur(x, [5, 5], [sigma, sigma])
            correct += (model(x).argmax(1) == y[i:i+2000]).sum().item()
    return correct / len(X)
for path in sys.argv[1:]:
    m, _ = load_checkpoint(path)
    print(path, " ".join(f"s{s}:{acc(m, s)*100:.2f}" for s in (0, 0.5, 0.75, 1.0)))
