"""The distillation engine: one loop for every data-free method.

Per student step: (every ``student_steps_per_round`` steps) let the synthesizer run a
synthesis round; draw a batch; take the student step with the method's named losses; step
the schedule. Loss terms are accumulated on the device and only read back at logging
intervals (no host synchronisation in the inner loop). Evaluation on the real test split
is for reporting only; the number reported is the final one.

Whether every step's total loss (and synthesis terms) was finite is accumulated in a device
tensor and read (one sync) at logging steps, before every save (with the student's weights)
and at the end; a non-finite step stops the run (:class:`DistillationError`) unsaved.
State (``state.pt``, with the resolved config; ``synthesizer.pt``) is saved at round ends every
``checkpoint_seconds`` and/or ``checkpoint_every`` steps, at the end, and on Ctrl-C: the first
SIGINT finishes the round, saves it and raises :class:`RunInterrupted`; a second stops at once.
:mod:`dfkd.engine.rundir` states what a run directory guarantees.

Under ``torchrun`` (``RunOptions.world``, :mod:`dfkd.engine.distributed`) every rank runs this
loop on its own share of the images: the student steps through ``DistributedDataParallel``
(identical weights everywhere), the finiteness guard and the logged terms are reduced over the
ranks, the decision to save is rank 0's, evaluation is sharded, and only rank 0 writes; the
state holds every rank's synthesizer and random state, so a run resumes with the same number
of processes only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfkd.engine.distributed import (
    SINGLE,
    World,
    all_gather_cat,
    average_gradients,
    broadcast_buffers,
    gather_objects,
    mean_over_ranks,
    rank0_flags,
    replicas_differ,
    shard,
    sum_int,
    to_cpu,
    wrap_student,
)
from dfkd.engine.ema import WeightAverage
from dfkd.engine.evaluation import EvalData, match_rate, per_class_accuracy, predict
from dfkd.engine.guard import FiniteGuard, NonFiniteError
from dfkd.engine.optim import StudentOptim
from dfkd.engine.rundir import DeferredInterrupt, ResumeError, check_resume_config, write_metrics  # noqa: F401  (ResumeError: re-exported)
from dfkd.engine.state import STATE_FORMAT, DistillationError, read_state
from generators.base import Synthesizer
from teachers.checkpoint import save_checkpoint
from teachers.files import torch_save

log = logging.getLogger("dfkd")

class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; ``saved_step`` is the step of the state on disk (None: none)."""

    def __init__(self, run_dir, saved_step: int | None):
        super().__init__(f"interrupted; resume with --resume {run_dir}")
        self.run_dir = Path(run_dir)
        self.saved_step = saved_step


@dataclass
class RunOptions:
    steps: int
    eval_every: int = 0  # 0: only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # 0: by time only (in student steps, rounded to rounds)
    checkpoint_seconds: float = 300.0  # save at the first round end this long after the last save; 0: off
    config: dict | None = None  # the resolved run config, saved in state.pt and compared on resume
    config_defaults: dict | None = None  # values of keys a saved config lacks (written before they existed)
    progress: bool = True
    seed: int = 0
    extra_summary: dict = field(default_factory=dict)
    student_ema: float = 0.0  # decay of a moving average of the student's weights (dfkd.engine.ema); 0: off
    student_optim: StudentOptim | None = None  # None: the method's recipe (Synthesizer.student_recipe)
    world: World = SINGLE  # the processes of a torchrun launch (dfkd.engine.distributed)


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
        self.world = options.world
        self.train_student = wrap_student(student, self.world, self.device)  # DDP under torchrun
        self.step = 0
        self.elapsed = 0.0
        self.metrics: list[dict] = []
        self.synth.attach_student(student)
        # fp16 forward passes: the student's loss is scaled so small gradients do not flush to zero
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=synthesizer.precision == "fp16")
        self.extra = extra = [p for p in synthesizer.extra_parameters() if p.requires_grad]
        if extra:  # parameters the method trains with the student (e.g. feature-amalgamation adapters)
            self.optimizer.add_param_group({"params": extra})
            self.base_lrs.append(self.optimizer.param_groups[-1]["lr"])
        synthesizer.plan(options.steps)
        self.ema = WeightAverage(student, options.student_ema) if options.student_ema else None
        self._teacher_predictions = None
        self._last_eval: tuple[int, dict] | None = None  # (step, result) of the latest evaluation
        self._last_predictions: torch.Tensor | None = None  # the student's, at the latest evaluation
        self.saved_step: int | None = None  # the step of the state on disk
        self._interrupt = None  # the DeferredInterrupt of a running loop
        self.guard = FiniteGuard(self.device, self.world)

    # -- persistence ----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    def save_state(self) -> None:
        """Write ``state.pt`` and ``synthesizer.pt`` (after :meth:`check_finite`, when run by the
        loop); under torchrun every rank calls it, rank 0 writes every rank's synthesizer and
        random state."""
        own = {"synthesizer": self.synth.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        ranks = gather_objects(to_cpu(own) if self.world.distributed else None, self.world)
        self.saved_step = self.step
        if not self.world.is_main:
            return
        state = {
            "format": STATE_FORMAT,
            "config": self.opts.config,
            "step": self.step,
            "elapsed": self.elapsed,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **own,  # rank 0's synthesizer and random state
            "metrics": self.metrics,
            "world_size": self.world.world_size,
        }
        if self.world.distributed:
            state["rank_states"] = ranks
        if self.ema is not None:
            state["student_ema"] = self.ema.state_dict()
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        torch_save(self.state_path, state)
        torch_save(self.run_dir / "synthesizer.pt", {"format": "dfkd-synthesizer/1", "method": self.synth.name,
                                                     "state": own["synthesizer"]})

    def load_state(self, config: dict | None = None) -> None:
        """Continue from ``state.pt``. With ``config`` (the resolved config of ``config.yaml``),
        refuse (:class:`ResumeError`) a config that differs from the one the state was saved
        with, except in :data:`dfkd.engine.rundir.RESUME_FREE_KEYS`."""
        state = read_state(self.state_path, self.device, self.world)
        if config is not None and isinstance(state.get("config"), dict):
            saved = {**(self.opts.config_defaults or {}), **state["config"]}
            check_resume_config(self.run_dir / "config.yaml", saved, config, int(state["step"]))
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.synth.load_state_dict(state["synthesizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistillationError(f"cannot resume from {self.state_path}: the saved state does not fit this run's "
                                    f"student, optimiser or method ({first[:200]}); was config.yaml edited?") from None
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.metrics = list(state["metrics"])
        if self.ema is not None:
            if "student_ema" not in state:
                raise DistillationError(f"{self.state_path} was written without student_ema; resume with the run's own config")
            self.ema.load_state_dict(state["student_ema"])
        self.saved_step = self.step
        self.guard.reset(self.step)

    # -- the non-finite guard -----------------------------------------------------------
    def check_finite(self, weights: bool = False, terms: dict | None = None) -> None:
        """Raise :class:`DistillationError` if a step since the guard was reset (or, with
        ``weights``, the student's weights) was non-finite: one host synchronisation."""
        try:
            self.guard.check(self.step, self.student if weights else None, terms)
        except NonFiniteError as exc:
            kept = (f"the last good state (step {self.saved_step}) is kept in {self.run_dir}"
                    if self.saved_step is not None else f"no state was saved in {self.run_dir}")
            raise DistillationError(f"{exc}; the run was stopped and nothing from that step on was saved; {kept}; "
                                    "lower the learning rate (--student-lr) or check the teacher") from None

    # -- evaluation -----------------------------------------------------------------------
    def _predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Arg-max predictions on ``images``; under torchrun each rank predicts its shard."""
        if not self.world.distributed:
            return predict(model, images, self.device)
        own = predict(model, images[shard(len(images), self.world)], self.device)
        return all_gather_cat(own.to(self.device), self.world).cpu()

    def evaluate(self) -> dict:
        if self.eval_data is None:
            return {}
        data = self.eval_data
        broadcast_buffers(self.student, self.world)  # every replica evaluates rank 0's student
        if self._teacher_predictions is None:
            self._teacher_predictions = self._predict(self.teacher, data.images)
        student_pred = self._predict(self.student, data.images)
        raw = {}
        if self.ema is not None:  # the delivered student is the average; keep the trained weights' accuracy beside it
            raw = {"raw_student_accuracy": match_rate(student_pred, data.labels)}
            with self.ema.swapped_in():
                student_pred = self._predict(self.student, data.images)
        result = {
            "student_accuracy": match_rate(student_pred, data.labels),
            "agreement": match_rate(student_pred, self._teacher_predictions),
            **raw,
        }
        self._last_eval = (self.step, result)
        self._last_predictions = student_pred
        return result

    def _write_metrics_csv(self) -> None:
        if self.world.is_main:
            write_metrics(self.run_dir, self.metrics)

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
        values = {k: (v.float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device))
                  for k, v in values.items()}
        if values:
            stacked = mean_over_ranks(torch.stack(list(values.values())), self.world).cpu().tolist()  # one sync per log interval
            for key, value in zip(values, stacked):
                if not math.isfinite(value):  # the guard checked the total; a term may still overflow alone
                    raise DistillationError(f"loss term {key!r} became non-finite ({value}) by step {self.step}; "
                                            f"the run was stopped; the last saved state is in {self.run_dir}")
                row[key] = round(value, 6)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["images_synthesized"] = sum_int(self.synth.images_synthesized, self.world)
        if evaluate:
            result = self.evaluate()
            row.update(result)
        return row

    def run(self) -> dict:
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        opts = self.opts
        steps_per_round = self.synth.student_steps_per_round
        self.student.train()
        self.teacher.eval()
        sums: dict[str, torch.Tensor] = {}  # student loss terms since the last log
        count = 0
        gen_sums: dict[str, torch.Tensor] = {}  # synthesis-round terms since the last log
        gen_count = 0
        progress = None
        if opts.progress and self.world.is_main:
            from tqdm import tqdm

            progress = tqdm(total=opts.steps, initial=self.step, desc=f"distill[{self.synth.name}]", unit="step", dynamic_ncols=True)
        last_accuracy = None
        last_saved, last_saved_time = self.step, time.monotonic()
        started = time.perf_counter() - self.elapsed
        self._interrupt = interrupt = DeferredInterrupt("saving at the end of this round")
        try:
            while self.step < opts.steps:
                gen_terms = None
                if self.step % steps_per_round == 0:
                    gen_terms = self.synth.synthesize(self.student)
                    for key, value in gen_terms.items():
                        gen_sums[key] = gen_sums.get(key, 0) + value
                    gen_count += 1
                self._set_lr()
                batch = self.synth.sample()
                losses, _, _ = self.synth.student_losses(self.train_student, batch)
                total = sum(losses.values())
                self.guard.fold(total, gen_terms)  # device ops only
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                average_gradients(self.extra, self.world)  # the student's own are averaged by DDP
                if self.grad_clip > 0:  # one fused norm, no host sync
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
                    if self.extra:  # what the method trains beside the student (peers, adapters), on its own norm
                        torch.nn.utils.clip_grad_norm_(self.extra, self.grad_clip)
                self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
                self.scaler.update()
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
                    self.check_finite(terms={**sums, **gen_sums})  # one sync, before anything is written
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
                if not at_round_end:
                    continue
                stop = interrupt.requested
                due = (at_end or stop
                       or (opts.checkpoint_every and self.step - last_saved >= opts.checkpoint_every)
                       or (opts.checkpoint_seconds and time.monotonic() - last_saved_time >= opts.checkpoint_seconds))
                due, stop = rank0_flags(self.world, self.device, due, stop)  # one decision for every rank
                if due:
                    self.elapsed = time.perf_counter() - started
                    if self.step != self.saved_step:
                        self.check_finite(weights=True, terms={**sums, **gen_sums})
                        self.save_state()
                    last_saved, last_saved_time = self.step, time.monotonic()
                if stop:
                    raise RunInterrupted(self.run_dir, self.saved_step)
        except KeyboardInterrupt as exc:  # Ctrl-C twice, or raised by code: the state on disk is the last saved
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted(self.run_dir, self.saved_step) from None
        finally:
            interrupt.close()
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
        self.check_finite(weights=True)
        gap = replicas_differ(self.student, self.world)
        if gap > 0:
            raise DistillationError(f"the student's replicas differ across processes (by up to {gap:.3g}); "
                                    "nothing was saved; a method trains the student outside DistributedDataParallel")
        broadcast_buffers(self.student, self.world)
        if self.metrics:
            self._write_metrics_csv()
        meta = dict(self.student_meta)
        meta["test_accuracy"] = final.get("student_accuracy")
        if self.world.is_main:
            save_checkpoint(self.run_dir / "student.pt", self.student, meta)
        summary = {
            "method": self.synth.name,
            "student_accuracy": final.get("student_accuracy"),
            "teacher_accuracy": self.teacher_accuracy,
            "agreement": final.get("agreement"),
            "steps": self.step,
            "wall_seconds": round(self.elapsed, 2),
            "images_synthesized": sum_int(self.synth.images_synthesized, self.world),
            "options": self.synth.options,
            "world_size": self.world.world_size,
        }
        if self.ema is not None:
            summary.update(student_ema=self.ema.decay, raw_student_accuracy=final.get("raw_student_accuracy"))
        if self.eval_data is not None and student_predictions is not None:
            num_classes = self.synth.num_classes
            summary["per_class_accuracy"] = per_class_accuracy(student_predictions, self.eval_data.labels, num_classes)
        summary.update(self.opts.extra_summary)
        return summary
