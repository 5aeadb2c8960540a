"""What the session-8 diagnostics share: the kept teacher and a Fast run's memory bank."""
import torch

from teachers.checkpoint import load_checkpoint

TEACHER = "benchmarks/teachers/fm_lenet5_bn_seed0.pt"


def load_model(path: str) -> torch.nn.Module:
    """A zoo checkpoint (teacher or student) in eval mode, on the CPU."""
    model, _ = load_checkpoint(path)
    return model.eval()


def load_bank(run_dir: str) -> torch.Tensor:
    """The memory-bank images of a Fast run (``RUN_DIR/synthesizer.pt``, tensors only)."""
    saved = torch.load(f"{run_dir}/synthesizer.pt", weights_only=True, map_location="cpu")
    if not isinstance(saved, dict) or saved.get("format") != "dfkd-synthesizer/1" or "pool" not in saved.get("state", {}):
        raise SystemExit(f"{run_dir}/synthesizer.pt is not the synthesizer state of a Fast run")
    return saved["state"]["pool"]["images"]
