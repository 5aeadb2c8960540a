"""The distillation engine: resume equivalence, non-finite losses, run directory contents."""

import pytest
import torch

from dfkd.core.schedule import learning_rate_factor
from dfkd.engine.evaluation import EvalData
from dfkd.engine.run import DistillationError, DistillationRun, RunOptions
from generators import create_synthesizer
from teachers import build_model, freeze


def make_run(run_dir, steps=12, checkpoint_every=4, seed=0, method="dafl", student_ema=0.0):
    torch.manual_seed(seed)
    teacher = build_model("lenet5_bn", 10, 1, 32, (0.3,), (0.35,))
    teacher.train()
    with torch.no_grad():
        teacher(torch.rand(32, 1, 32, 32))
    teacher = freeze(teacher)
    student = build_model("lenet5_half", 10, 1, 32, (0.3,), (0.35,))
    synth = create_synthesizer(method, teacher, image_shape=(1, 32, 32), num_classes=10, seed=seed, batch_size=16, ngf=8)
    eval_data = EvalData(torch.rand(40, 1, 32, 32), torch.randint(0, 10, (40,)))
    meta = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(i) for i in range(10)],
            "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "seed": seed}
    return DistillationRun(teacher, student, synth, run_dir, RunOptions(steps=steps, eval_every=6, log_every=3,
                           checkpoint_every=checkpoint_every, progress=False, student_ema=student_ema),
                           eval_data=eval_data, student_meta=meta)


@pytest.mark.parametrize("method,student_ema", [("dafl", 0.0), ("dfad", 0.0), ("dafl", 0.9)])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, method, student_ema):
    full = make_run(tmp_path / "full", method=method, student_ema=student_ema)
    full_summary = full.run()

    killed = make_run(tmp_path / "killed", method=method, student_ema=student_ema)
    original = killed.synth.synthesize
    calls = {"n": 0}

    def dying(student):
        calls["n"] += 1
        if killed.step >= 7:
            raise KeyboardInterrupt
        return original(student)

    killed.synth.synthesize = dying
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert not (tmp_path / "killed" / "student.pt").exists()

    resumed = make_run(tmp_path / "killed", method=method, student_ema=student_ema)
    resumed.load_state()
    assert 0 < resumed.step < 12
    summary = resumed.run()
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)
    assert summary["steps"] == 12
    assert full_summary["student_accuracy"] == summary["student_accuracy"]


def test_student_grad_clip_bounds_each_step(tmp_path):
    def one_step(clip):
        run = make_run(tmp_path / f"clip{clip}", steps=1)
        run.grad_clip = clip
        run.optimizer = torch.optim.SGD(run.student.parameters(), lr=1.0)  # a step of exactly the gradient
        run.base_lrs = [1.0]
        before = [p.detach().clone() for p in run.student.parameters()]
        run.run()
        return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(run.student.parameters(), before)))

    assert one_step(0.0) > 1e-3
    assert 0 < one_step(1e-6) <= 1.01e-6  # float32 rounding of the weights


def test_student_ema_is_the_delivered_student_and_follows_its_formula(tmp_path):
    run = make_run(tmp_path / "ema", steps=12, student_ema=0.5)
    trained = []  # the student's weights after every optimiser step
    step = run.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        trained.append([p.detach().clone() for p in run.student.parameters()])
        return out

    run.optimizer.step = recording_step
    expected = [p.detach().clone() for p in run.student.parameters()]
    summary = run.run()
    for t, weights in enumerate(trained, start=1):  # w <- d w + (1 - d) w_t, d = min(0.5, (1 + t) / (10 + t))
        d = min(0.5, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    for delivered, want, last in zip(run.student.parameters(), expected, trained[-1]):
        assert torch.allclose(delivered, want, atol=1e-6)
        assert not torch.allclose(delivered, last)  # the average, not the last trained weights
    from teachers import load_checkpoint

    saved, _ = load_checkpoint(tmp_path / "ema" / "student.pt")
    for a, b in zip(saved.parameters(), run.student.parameters()):
        assert torch.equal(a, b)
    assert summary["student_ema"] == 0.5 and 0.0 <= summary["raw_student_accuracy"] <= 1.0


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_student_ema_rejects_a_decay_outside_zero_one(decay):
    from dfkd.engine.ema import WeightAverage

    with pytest.raises(ValueError, match="student_ema"):
        WeightAverage(torch.nn.Linear(2, 2), decay)


def test_run_directory_contents(tmp_path):
    summary = make_run(tmp_path / "run").run()
    for name in ("metrics.csv", "student.pt", "synthesizer.pt", "state.pt"):  # summary.json: the caller's
        assert (tmp_path / "run" / name).exists(), name
    for key in ("method", "student_accuracy", "teacher_accuracy", "agreement", "steps", "wall_seconds", "images_synthesized"):
        assert key in summary
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,seconds") and "student_accuracy" in rows[0] and "agreement" in rows[0]
    assert len(rows) == 1 + 2  # evaluations at steps 6 and 12
    from teachers import load_checkpoint

    student, meta = load_checkpoint(tmp_path / "run" / "student.pt")
    assert meta["test_accuracy"] == summary["student_accuracy"]


def test_non_finite_loss_stops_with_term_and_step_and_keeps_last_good_state(tmp_path):
    run = make_run(tmp_path / "nan", steps=12, checkpoint_every=3)
    original = run.synth.student_losses

    def poisoned(student, batch):
        losses, s, t = original(student, batch)
        if run.step >= 4:
            losses["kd"] = losses["kd"] * float("nan")
        return losses, s, t

    run.synth.student_losses = poisoned
    with pytest.raises(DistillationError, match=r"non-finite at step 5 \(loss term 'kd'\).*last good state \(step 3\)"):
        run.run()
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_non_finite_step_between_logs_is_never_saved(tmp_path):
    """A NaN at step 3 with a log every 5 steps and a checkpoint every 2: the checkpoint of
    step 4 is refused (the guard is read before every save), state.pt stays at step 2."""
    run = make_run(tmp_path / "nan", steps=12, checkpoint_every=2)
    run.opts.log_every, run.opts.eval_every = 5, 0
    original = run.synth.student_losses

    def poisoned(student, batch):
        losses, s, t = original(student, batch)
        if run.step == 2:  # only the third step is bad
            losses["kd"] = losses["kd"] * float("inf")
        return losses, s, t

    run.synth.student_losses = poisoned
    syncs = []
    check = run.check_finite
    run.check_finite = lambda **kw: (syncs.append(run.step), check(**kw))[1]
    with pytest.raises(DistillationError, match=r"non-finite at step 3 .*last good state \(step 2\)"):
        run.run()
    assert syncs == [2, 4]  # read at checkpoints (and log steps) only, not every step
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "student.pt").exists()


def test_non_finite_weights_are_not_saved_even_with_finite_losses(tmp_path):
    run = make_run(tmp_path / "w", steps=4, checkpoint_every=2)
    run.opts.log_every, run.opts.eval_every = 0, 0
    step = run.optimizer.step

    def diverging(*args, **kwargs):
        out = step(*args, **kwargs)
        if run.step == 3:  # the fourth step's update diverges; its loss was finite
            with torch.no_grad():
                next(run.student.parameters()).fill_(float("nan"))
        return out

    run.optimizer.step = diverging
    with pytest.raises(DistillationError, match="weights became non-finite"):
        run.run()
    assert torch.load(tmp_path / "w" / "state.pt", weights_only=True)["step"] == 2


def test_state_is_saved_by_time_by_default(tmp_path, monkeypatch):
    import dfkd.engine.run as engine

    clock = {"t": 0.0}

    def monotonic():
        clock["t"] += 100.0  # every call 100 s later: a save is due every 3 round ends
        return clock["t"]

    monkeypatch.setattr(engine.time, "monotonic", monotonic)
    run = make_run(tmp_path / "t", steps=12, checkpoint_every=0)
    assert run.opts.checkpoint_seconds == 300
    saved = []
    save = run.save_state
    run.save_state = lambda: (saved.append(run.step), save())[1]
    run.run()
    assert saved[-1] == 12 and len(saved) >= 3 and saved[0] < 12


def test_ctrl_c_saves_at_the_round_end_and_resumes_to_the_same_student(tmp_path):
    import os
    import signal

    from dfkd.engine.run import RunInterrupted

    full = make_run(tmp_path / "full", checkpoint_every=0)
    full.run()
    run = make_run(tmp_path / "int", checkpoint_every=0)
    original = run.synth.sample

    def interrupted():
        if run.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 6
        return original()

    run.synth.sample = interrupted
    with pytest.raises(RunInterrupted) as info:
        run.run()
    assert info.value.saved_step == 6 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = make_run(tmp_path / "int", checkpoint_every=0)
    resumed.load_state()
    assert resumed.step == 6
    resumed.run()
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)


def test_learning_rate_schedules():
    assert learning_rate_factor("cosine", 0, 10) == 1.0
    assert abs(learning_rate_factor("cosine", 5, 10) - 0.5) < 1e-9
    assert learning_rate_factor("step", 6, 10) == pytest.approx(0.1)
    assert learning_rate_factor("constant", 9, 10) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        learning_rate_factor("linear", 1, 10)
