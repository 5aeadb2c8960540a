"""The distillation engine: one loop for every data-free method.

Per student step: (every ``student_steps_per_round`` steps) let the synthesizer run a
synthesis round; draw a batch; take the student step with the method's named losses; step
the schedule. Loss terms are accumulated on the device and only read back at logging
intervals (no host synchronisation in the inner loop). Evaluation on the real test split
is for reporting only; the number reported is the final one.

The run directory holds ``metrics.csv``, ``summary.json``, ``student.pt`` (a zoo
checkpoint), ``synthesizer.pt`` and ``state.pt`` (everything needed to resume).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfkd.ema import WeightAverage
from generators.base import Synthesizer, cosine_factor
from teachers.checkpoint import save_checkpoint

log = logging.getLogger("dfkd")

STATE_FORMAT = "dfkd-run-state/1"


class DistillationError(RuntimeError):
    """A run that cannot continue (non-finite loss, inconsistent resume state)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def atomic_json(path: Path, data) -> None:
    """Write JSON through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_torch_save(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build_student_optimizer(student: nn.Module, options: dict) -> torch.optim.Optimizer:
    name = options["student_optimizer"]
    lr = float(options["student_lr"])
    wd = float(options["student_weight_decay"])
    if name == "adam":
        return torch.optim.Adam(student.parameters(), lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(student.parameters(), lr=lr, momentum=float(options["student_momentum"]), weight_decay=wd, nesterov=True)
    raise ValueError(f"unknown student optimizer {name!r}; use 'adam' or 'sgd'")


def learning_rate_factor(schedule: str, step: int, total: int) -> float:
    """``cosine``: cosine annealing to 0; ``step``: x0.1 at 50% and 75% of the run;
    ``constant``: 1."""
    if schedule == "cosine":
        return cosine_factor(step, total)
    if schedule == "step":
        return 0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, step or constant")


@dataclass
class EvalData:
    """Real test images (``[0,1]``) and labels, used for reporting only."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = "test"


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        with (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)):
            out.append(model(x).float().argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def match_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree (accuracy, or teacher agreement)."""
    return float((predictions == targets).float().mean())


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    result = []
    for k in range(num_classes):
        mask = labels == k
        result.append(float((predictions[mask] == k).float().mean()) if mask.any() else None)
    return result


@dataclass
class RunOptions:
    steps: int
    eval_every: int = 0  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end (in student steps, rounded to rounds)
    progress: bool = True
    seed: int = 0
    extra_summary: dict = field(default_factory=dict)
    student_ema: float = 0.0  # decay of a moving average of the student's weights (dfkd.ema); 0: off


class DistillationRun:
    """Run (or resume) a data-free distillation into ``run_dir``."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        synthesizer: Synthesizer,
        run_dir,
        options: RunOptions,
        eval_data: EvalData | None = None,
        student_meta: dict | None = None,
        teacher_accuracy: float | None = None,
        device=None,
    ):
        self.teacher = teacher
        self.student = student
        self.synth = synthesizer
        self.run_dir = Path(run_dir)
        self.opts = options
        self.eval_data = eval_data
        self.student_meta = dict(student_meta or {})
        self.teacher_accuracy = teacher_accuracy
        self.device = torch.device(device) if device is not None else synthesizer.device
        self.optimizer = build_student_optimizer(student, synthesizer.options)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.grad_clip = float(synthesizer.options.get("student_grad_clip", 0.0))
        self.step = 0
        self.elapsed = 0.0
        self.metrics: list[dict] = []
        self.synth.attach_student(student)
        extra = [p for p in getattr(synthesizer, "extra_parameters", lambda: ())() if p.requires_grad]
        if extra:  # parameters the method trains with the student (e.g. feature-amalgamation adapters)
            self.optimizer.add_param_group({"params": extra})
            self.base_lrs.append(self.optimizer.param_groups[-1]["lr"])
        if "generator_total_steps" in synthesizer.options and not synthesizer.options["generator_total_steps"]:
            synthesizer.options["generator_total_steps"] = math.ceil(options.steps / synthesizer.student_steps_per_round)
        self.ema = WeightAverage(student, options.student_ema) if options.student_ema else None
        self._teacher_predictions = None
        self._last_eval: tuple[int, dict] | None = None  # (step, result) of the latest evaluation

    # -- persistence ----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    def save_state(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "elapsed": self.elapsed,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "synthesizer": self.synth.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "metrics": self.metrics,
        }
        if self.ema is not None:
            state["student_ema"] = self.ema.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        atomic_torch_save(self.state_path, state)
        atomic_torch_save(self.run_dir / "synthesizer.pt", {"format": "dfkd-synthesizer/1", "method": self.synth.name,
                                                            "state": self.synth.state_dict()})

    def load_state(self) -> None:
        try:
            state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        except Exception as exc:  # corrupt or foreign file
            raise DistillationError(f"cannot resume from {self.state_path}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DistillationError(f"{self.state_path} is not a dfkd run state (format {STATE_FORMAT})")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.synth.load_state_dict(state["synthesizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.metrics = list(state["metrics"])
        if self.ema is not None:
            if "student_ema" not in state:
                raise DistillationError(f"{self.state_path} was written without student_ema; resume with the run's own config")
            self.ema.load_state_dict(state["student_ema"])

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict:
        if self.eval_data is None:
            return {}
        data = self.eval_data
        if self._teacher_predictions is None:
            self._teacher_predictions = predict(self.teacher, data.images, self.device)
        student_pred = predict(self.student, data.images, self.device)
        raw = {}
        if self.ema is not None:  # the delivered student is the average; keep the trained weights' accuracy beside it
            raw = {"raw_student_accuracy": match_rate(student_pred, data.labels)}
            with self.ema.swapped_in():
                student_pred = predict(self.student, data.images, self.device)
        result = {
            "student_accuracy": match_rate(student_pred, data.labels),
            "agreement": match_rate(student_pred, self._teacher_predictions),
            "_student_predictions": student_pred,
            **raw,
        }
        self._last_eval = (self.step, result)
        return result

    def _write_metrics_csv(self) -> None:
        keys: list[str] = []
        for row in self.metrics:
            for key in row:
                if key not in keys:
                    keys.append(key)
        tmp = self.run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            for row in self.metrics:
                writer.writerow(row)
        os.replace(tmp, self.run_dir / "metrics.csv")

    # -- the loop -------------------------------------------------------------------------
    def _set_lr(self) -> None:
        factor = learning_rate_factor(self.synth.options["student_schedule"], self.step, self.opts.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _record(self, sums: dict, count: int, gen_sums: dict, gen_count: int, evaluate: bool) -> dict:
        row = {"step": self.step, "seconds": round(self.elapsed, 2)}
        values = {k: (v / count) for k, v in sums.items()} if count else {}
        if gen_count:
            values.update({k: (v / gen_count) for k, v in gen_sums.items()})
        if values:
            stacked = torch.stack(list(values.values())).cpu().tolist()  # one sync per log interval
            for key, value in zip(values, stacked):
                if not math.isfinite(value):
                    raise DistillationError(
                        f"loss term {key!r} became non-finite ({value}) between steps "
                        f"{max(0, self.step - count)} and {self.step}; the last good state is kept in {self.run_dir}"
                    )
                row[key] = round(value, 6)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["images_synthesized"] = self.synth.images_synthesized
        if evaluate:
            result = self.evaluate()
            row.update({k: v for k, v in result.items() if not k.startswith("_")})
        return row

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        opts = self.opts
        steps_per_round = self.synth.student_steps_per_round
        checkpoint_every = opts.checkpoint_every or opts.steps
        self.student.train()
        self.teacher.eval()
        sums: dict[str, torch.Tensor] = {}  # student loss terms since the last log
        count = 0
        gen_sums: dict[str, torch.Tensor] = {}  # synthesis-round terms since the last log
        gen_count = 0
        progress = None
        if opts.progress:
            from tqdm import tqdm

            progress = tqdm(total=opts.steps, initial=self.step, desc=f"distill[{self.synth.name}]", unit="step", dynamic_ncols=True)
        last_accuracy = None
        last_saved = self.step
        started = time.perf_counter() - self.elapsed
        try:
            while self.step < opts.steps:
                if self.step % steps_per_round == 0:
                    gen_terms = self.synth.synthesize(self.student)
                    for key, value in gen_terms.items():
                        gen_sums[key] = gen_sums.get(key, 0) + value
                    gen_count += 1
                self._set_lr()
                batch = self.synth.sample()
                losses, _, _ = self.synth.student_losses(self.student, batch)
                total = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                if self.grad_clip > 0:  # one fused norm, no host sync
                    torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0) + value.detach()
                count += 1
                self.step += 1
                if progress is not None:
                    progress.update(1)
                at_end = self.step == opts.steps
                do_eval = at_end or (opts.eval_every and self.step % opts.eval_every == 0)
                do_log = do_eval or (opts.log_every and self.step % opts.log_every == 0)
                if do_log:
                    self.elapsed = time.perf_counter() - started
                    row = self._record(sums, count, gen_sums, gen_count, evaluate=bool(do_eval))
                    sums, count, gen_sums, gen_count = {}, 0, {}, 0
                    if do_eval:
                        self.metrics.append(row)
                        self._write_metrics_csv()
                        last_accuracy = row.get("student_accuracy", last_accuracy)
                    if progress is not None:
                        shown = {k: row[k] for k in list(row)[2:5] if isinstance(row[k], float)}
                        if last_accuracy is not None:
                            shown["acc"] = last_accuracy
                        progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
                    log.info("step %d %s", self.step, {k: v for k, v in row.items() if k != "step"})
                at_round_end = self.step % steps_per_round == 0 or at_end
                if at_round_end and (at_end or self.step - last_saved >= checkpoint_every):
                    last_saved = self.step
                    self.elapsed = time.perf_counter() - started
                    self.save_state()
        finally:
            if progress is not None:
                progress.close()
        self.elapsed = time.perf_counter() - started
        return self.finish()

    def finish(self) -> dict:
        # the loop evaluated at its last step; reuse that instead of evaluating twice
        final = dict(self._last_eval[1]) if self._last_eval and self._last_eval[0] == self.step else self.evaluate()
        student_predictions = final.pop("_student_predictions", None)
        if self.ema is not None:
            self.ema.copy_into()
        if self.metrics:
            self._write_metrics_csv()
        meta = dict(self.student_meta)
        meta["test_accuracy"] = final.get("student_accuracy")
        save_checkpoint(self.run_dir / "student.pt", self.student, meta)
        summary = {
            "method": self.synth.name,
            "student_accuracy": final.get("student_accuracy"),
            "teacher_accuracy": self.teacher_accuracy,
            "agreement": final.get("agreement"),
            "steps": self.step,
            "wall_seconds": round(self.elapsed, 2),
            "images_synthesized": self.synth.images_synthesized,
            "options": self.synth.options,
        }
        if self.ema is not None:
            summary.update(student_ema=self.ema.decay, raw_student_accuracy=final.get("raw_student_accuracy"))
        if self.eval_data is not None and student_predictions is not None:
            num_classes = self.synth.num_classes
            summary["per_class_accuracy"] = per_class_accuracy(student_predictions, self.eval_data.labels, num_classes)
        summary.update(self.opts.extra_summary)
        atomic_json(self.run_dir / "summary.json", summary)
        return summary
