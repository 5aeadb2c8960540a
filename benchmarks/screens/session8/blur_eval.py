"""Session-8 diagnostic: test accuracy of each given checkpoint on Fashion-MNIST test images
blurred with a 5x5 Gaussian of sigma 0 / 0.5 / 0.75 / 1. Usage (repo root):
PYTHONPATH=. .venv/bin/python benchmarks/screens/session8/blur_eval.py CHECKPOINT..."""
import sys

import torch
import torchvision.transforms.functional as TF

from common import load_model
from dfkd.analysis import predict_labels
from dfkd.data import load_dataset

torch.set_num_threads(1)
test = load_dataset("fashion-mnist", split="test")


def accuracy(model, sigma):
    images = TF.gaussian_blur(test.images, [5, 5], [sigma, sigma]) if sigma > 0 else test.images
    return (predict_labels(model, images, "cpu") == test.labels).double().mean().item()


for path in sys.argv[1:]:
    model = load_model(path)
    print(path, " ".join(f"s{s}:{accuracy(model, s)*100:.2f}" for s in (0, 0.5, 0.75, 1.0)))
