"""``dfkd demo``: train (or reuse) a digits teacher, distill a student data-free, report."""
from __future__ import annotations

import time
from pathlib import Path

from dfkd.api import DistillConfig, TeacherConfig, distill, train_teacher
from dfkd.cli.common import add_common, formatter, print_summary, sayer

#: The demo's distillation recipe: configs/fashion-mnist/best.yaml's method, sized for digits.
DEMO_RECIPE = {"method": "fast", "student": "lenet5_half", "steps": 600, "eval_every": 200,
               "student_lr": 0.05, "student_weight_decay": 5e-4,
               "options": {"ngf": 8, "synthesis_batch_size": 128, "batch_size": 128, "student_steps_per_round": 10,
                           "temperature": 1.0}}
#: The demo's teacher.
DEMO_TEACHER = {"dataset": "digits", "arch": "lenet5_bn", "epochs": 30, "batch_size": 64, "augment": "crop"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="digits: train a teacher, distill data-free, report", formatter_class=formatter)
    p.add_argument("--out", default="runs/demo", help="where the demo writes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="device")
    add_common(p, config=False)
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    teacher_path = out / "teacher_lenet5_bn_digits.pt"
    started = time.perf_counter()
    if not teacher_path.exists():
        teacher = train_teacher(TeacherConfig.from_layers(DEMO_TEACHER, {"seed": args.seed, "device": args.device,
                                                                          "out": str(teacher_path)}),
                                progress=not args.quiet, say=sayer(args))
        print(f"test accuracy {teacher.test_accuracy:.4f} ({teacher.dataset}, {teacher.test_images} test images) "
              f"in {teacher.seconds:.1f}s -> {teacher.path}")
    else:
        print(f"reusing teacher {teacher_path}")
    config = DistillConfig.from_layers(DEMO_RECIPE, {"teacher": str(teacher_path), "out": str(out / "distill"),
                                                     "seed": args.seed, "device": args.device})
    result = distill(config, overwrite=True, progress=not args.quiet, command="dfkd demo", say=sayer(args))
    print_summary(result.summary, result.run_dir)
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0
