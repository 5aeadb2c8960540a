"""Sure-teacher agreement (dfkd.quality.sure_teacher_agreement) on the real Fashion-MNIST test images for the
students of the run directories given; for runs older than the report section. Usage, from the repo root:
    PYTHONPATH=. .venv/bin/python benchmarks/screens/session9/sure_eval.py RUN_DIR [RUN_DIR ...]"""
import sys
import torch
from dfkd.analysis import model_logits, predict_labels
from dfkd.data import load_dataset
from dfkd.quality import sure_teacher_agreement
from teachers import freeze, load_checkpoint


def main(runs):
    teacher, meta = load_checkpoint("benchmarks/teachers/fm_lenet5_bn_seed0.pt")
    teacher = freeze(teacher)
    test = load_dataset("fashion-mnist", "test", image_size=32)
    with torch.no_grad():
        t_logits = model_logits(teacher, test.images, "cpu")
        for run in runs:
            student, _ = load_checkpoint(f"{run}/student.pt")
            result = sure_teacher_agreement(t_logits, predict_labels(freeze(student), test.images, "cpu"))
            print(run, round(100 * result["sure_agreement"], 2), [(m["teacher"], m["student"], m["count"]) for m in result["misses"][:3]])


if __name__ == "__main__":
    main(sys.argv[1:])
