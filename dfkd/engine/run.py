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
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfkd.engine.ema import WeightAverage
from dfkd.engine.evaluation import EvalData, match_rate, per_class_accuracy, predict
from dfkd.engine.optim import StudentOptim
from generators.base import Synthesizer
from teachers.checkpoint import save_checkpoint
from teachers.files import atomic_write, torch_save

log = logging.getLogger("dfkd")

STATE_FORMAT = "dfkd-run-state/1"


class DistillationError(RuntimeError):
    """A run that cannot continue (non-finite loss, inconsistent resume state)."""


@dataclass
class RunOptions:
    steps: int
    eval_every: int = 0  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end (in student steps, rounded to rounds)
    progress: bool = True
    seed: int = 0
    extra_summary: dict = field(default_factory=dict)
    student_ema: float = 0.0  # decay of a moving average of the student's weights (dfkd.engine.ema); 0: off
    student_optim: StudentOptim | None = None  # None: the method's recipe (Synthesizer.student_recipe)


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
        self.student_optim = options.student_optim or StudentOptim.resolve(synthesizer.student_recipe, {})
        self.optimizer = self.student_optim.build(student.parameters())
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.grad_clip = float(self.student_optim.grad_clip)
        self.step = 0
        self.elapsed = 0.0
        self.metrics: list[dict] = []
        self.synth.attach_student(student)
        extra = [p for p in synthesizer.extra_parameters() if p.requires_grad]
        if extra:  # parameters the method trains with the student (e.g. feature-amalgamation adapters)
            self.optimizer.add_param_group({"params": extra})
            self.base_lrs.append(self.optimizer.param_groups[-1]["lr"])
        synthesizer.plan(options.steps)
        self.ema = WeightAverage(student, options.student_ema) if options.student_ema else None
        self._teacher_predictions = None
        self._last_eval: tuple[int, dict] | None = None  # (step, result) of the latest evaluation
        self._last_predictions: torch.Tensor | None = None  # the student's, at the latest evaluation

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
        torch_save(self.state_path, state)
        torch_save(self.run_dir / "synthesizer.pt", {"format": "dfkd-synthesizer/1", "method": self.synth.name,
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
            **raw,
        }
        self._last_eval = (self.step, result)
        self._last_predictions = student_pred
        return result

    def _write_metrics_csv(self) -> None:
        keys: list[str] = []
        for row in self.metrics:
            for key in row:
                if key not in keys:
                    keys.append(key)

        def write(handle):
            writer = csv.DictWriter(handle, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            for row in self.metrics:
                writer.writerow(row)

        atomic_write(self.run_dir / "metrics.csv", write, mode="w")

    # -- the loop -------------------------------------------------------------------------
    def _set_lr(self) -> None:
        factor = self.student_optim.lr_factor(self.step, self.opts.steps)
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
            row.update(result)
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
        """Evaluate, write ``student.pt`` and return the run's summary (the caller writes
        ``summary.json`` once its analysis is added)."""
        # the loop evaluated at its last step; reuse that instead of evaluating twice
        final = dict(self._last_eval[1]) if self._last_eval and self._last_eval[0] == self.step else self.evaluate()
        student_predictions = self._last_predictions
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
        return summary
