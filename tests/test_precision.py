"""The precision policy: auto (bf16 on CUDA only), fp32, bf16 and fp16, tested on the CPU."""
import pytest
import torch

from generators import create_synthesizer
from teachers.device import DeviceError, autocast_dtype, batched_logits


def test_policy_by_device_and_name():
    assert autocast_dtype("cpu") is None and autocast_dtype("cuda") == torch.bfloat16
    assert autocast_dtype("cpu", "bf16") == torch.bfloat16 and autocast_dtype("cpu", "fp16") == torch.float16
    assert autocast_dtype("cuda", "fp32") is None
    with pytest.raises(DeviceError, match="use one of auto, fp32, bf16, fp16"):
        autocast_dtype("cpu", "fp8")


def test_bf16_on_the_cpu_runs_inference_and_a_synthesis_round(bn_teacher, student):
    images = torch.rand(12, 1, 32, 32)
    full = batched_logits(bn_teacher, images, "cpu", batch_size=5)
    half = batched_logits(bn_teacher, images, "cpu", batch_size=5, precision="bf16")
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    assert torch.allclose(full, half, atol=0.1, rtol=0.05)
    synth = create_synthesizer("fast", bn_teacher, image_shape=(1, 32, 32), num_classes=10, precision="bf16",
                               ngf=8, nz=16, synthesis_batch_size=8, batch_size=8, warmup_rounds=1)
    terms = synth.synthesize(student)
    assert all(torch.isfinite(v) for v in terms.values())
    losses, student_logits, _ = synth.student_losses(student, synth.sample())
    assert torch.isfinite(losses["kd"]) and student_logits.dtype == torch.float32
    with pytest.raises(DeviceError):
        create_synthesizer("fast", bn_teacher, image_shape=(1, 32, 32), num_classes=10, precision="half")


def test_fp16_scales_the_student_loss_and_channels_last_runs(bn_teacher, tmp_path):
    """``precision=fp16`` trains the student through a gradient scaler (its state saved for
    resuming); ``channels_last`` keeps the student channels-last; both run on the CPU."""
    from dfkd.api import distill
    from teachers import save_checkpoint

    meta = {"dataset": "digits", "classes": list(range(10)), "class_names": [str(k) for k in range(10)],
            "mean": [0.3], "std": [0.35], "image_shape": [1, 32, 32], "test_accuracy": 0.1, "seed": 0}
    save_checkpoint(tmp_path / "t.pt", bn_teacher, meta)
    result = distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "run"), method="fast", steps=6, no_eval=True,
                     samples=8, device="cpu", precision="fp16", channels_last=True, progress=False,
                     options={"ngf": 8, "nz": 16, "synthesis_batch_size": 8, "batch_size": 8, "warmup_rounds": 1,
                              "student_steps_per_round": 3})
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0 and state["config"]["channels_last"] is True
    student, _ = result.load_student()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    fp32 = distill(teacher=str(tmp_path / "t.pt"), out=str(tmp_path / "fp32"), method="fast", steps=3, no_eval=True,
                   samples=8, device="cpu", progress=False,
                   options={"ngf": 8, "nz": 16, "synthesis_batch_size": 8, "batch_size": 8, "warmup_rounds": 1})
    assert "grad_scaler" not in torch.load(fp32.run_dir / "state.pt", weights_only=True)
