"""torch.distributed helpers: pure parts here, the collective ones in 2 gloo processes."""
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd.engine.distributed import SINGLE, DistributedError, World, per_rank_batch, rank_seed, shard

ROOT = Path(__file__).resolve().parents[1]


def test_batch_split_and_shards():
    two = World(rank=1, world_size=2)
    assert per_rank_batch(256, two) == 128 and per_rank_batch(7, SINGLE) == 7
    with pytest.raises(DistributedError, match=r"use a multiple of 3, e.g. 255 or 258"):
        per_rank_batch(256, World(0, 3))
    shares = [shard(10, World(r, 3)) for r in range(3)]
    assert [list(range(10))[s] for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rank_seed(5, SINGLE) == 5 and rank_seed(5, two) != 5


WORKER = r"""
import os, sys, torch
import torch.distributed as dist
from dfkd.core.collective import global_mean_var
from dfkd.engine.distributed import all_gather_cat, init_from_env, shutdown, sum_int, wrap_student


# every check in one function: its tensors, autograd graphs and DDP wrapper (which hold the
# process group) are gone when it returns, so that no gloo thread outlives the group at exit
def checks(world, device):
    torch.manual_seed(0)
    full = torch.randn(7, 3, 4, 4)
    mine = full[:3] if world.rank == 0 else full[3:]
    # counts and uneven gathers
    assert sum_int(world.rank + 1, world) == 3
    assert torch.equal(all_gather_cat(mine, world), full)
    # global BN moments through a differentiable all-reduce, gradients to each rank's own images
    x = mine.clone().requires_grad_(True)
    mean, var = global_mean_var(x, [0, 2, 3])
    ref_var, ref_mean = torch.var_mean(full, dim=[0, 2, 3], unbiased=False)
    assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(var, ref_var, atol=1e-5)
    (mean.sum() + var.sum()).backward()
    ref = full.clone().requires_grad_(True)
    rv, rm = torch.var_mean(ref, dim=[0, 2, 3], unbiased=False)
    (rm.sum() + rv.sum()).backward()
    expected = ref.grad[:3] if world.rank == 0 else ref.grad[3:]
    assert torch.allclose(x.grad, expected, atol=1e-5), (x.grad - expected).abs().max()
    # a BN-statistics hook with global moments scores each rank's share as the whole batch
    from dfkd.core.bn import BNStatisticsHook
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(0.1)
    bn.running_var.fill_(2.0)
    hook = BNStatisticsHook(bn, global_moments=True)
    bn(mine)
    shared = hook.loss()
    hook.close()
    hook = BNStatisticsHook(bn)
    bn(full)
    assert torch.allclose(shared, hook.loss(), atol=1e-5)
    hook.close()
    # a DDP student stays identical on both ranks after steps on different data
    torch.manual_seed(1)
    student = wrap_student(torch.nn.Linear(4, 2), world, device)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        student(torch.randn(5, 4) * (world.rank + 1)).square().mean().backward()
        opt.step()
    weights = torch.cat([p.detach().flatten() for p in student.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    assert torch.equal(gathered[0], gathered[1])


world, device = init_from_env(torch.device("cpu"))
checks(world, device)
shutdown()
print("ok", world.rank)
"""


def test_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2  # both ranks got through every check (their prints may interleave)


# ----------------------------------------------------------------------------- dfkd distill under torchrun
TINY_FAST = """method: fast
student: lenet5_half
steps: 200
batch_size: 64
student_lr: 0.05
options: {ngf: 16, nz: 32, synthesis_batch_size: 64, warmup_rounds: 3, student_steps_per_round: 20, flip: false}
"""


def _dfkd(args, processes: int = 1):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [sys.executable])
    return subprocess.run([*launch, "-m", "dfkd", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_torchrun_writes_one_run_directory_and_resumes_only_with_its_world(tmp_path):
    """The quick part of the test below (20 steps): two processes write one run directory with
    the one-process image count, an unfinished run resumes only with two processes, and a
    global batch the processes cannot share is refused before anything is written."""
    import json

    teacher = tmp_path / "t.pt"
    assert _dfkd(["train-teacher", "--dataset", "digits", "--epochs", 1, "--quiet", "--out", teacher]).returncode == 0
    (tmp_path / "tiny.yaml").write_text(TINY_FAST.replace("steps: 200", "steps: 20"))
    common = ["distill", "--teacher", teacher, "--config", tmp_path / "tiny.yaml", "--quiet"]
    two = _dfkd([*common, "--out", tmp_path / "two", "eval_every=0"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["options"]["batch_size"] == 64
    for name in ("report.md", "summary.json"):
        (tmp_path / "two" / name).unlink()
    refused = _dfkd(["distill", "--resume", tmp_path / "two", "--quiet"])
    assert refused.returncode == 3 and "written by 2 process(es), this run has 1" in refused.stderr
    odd = _dfkd([*common, "--out", tmp_path / "odd", "batch_size=63"], processes=2)
    assert odd.returncode != 0 and not (tmp_path / "odd").exists()
    assert "batch_size 63 cannot be split over 2 processes" in odd.stderr


@pytest.mark.slow
def test_torchrun_distill_matches_one_process_and_resumes_only_with_its_world(tmp_path):
    """``torchrun --nproc_per_node=2 -m dfkd distill`` on digits: one run directory written by
    rank 0, the global batch and image count of one process, the replicas identical (the engine
    refuses to save otherwise), accuracy within noise of one process (measured: 66.9% with one
    process, 66.2% with two, teacher 95.3%); resuming needs the same number of processes."""
    import json

    teacher = tmp_path / "t.pt"
    assert _dfkd(["train-teacher", "--dataset", "digits", "--epochs", 4, "--quiet", "--out", teacher]).returncode == 0
    (tmp_path / "tiny.yaml").write_text(TINY_FAST)
    common = ["distill", "--teacher", teacher, "--config", tmp_path / "tiny.yaml", "--quiet"]
    one = _dfkd([*common, "--out", tmp_path / "one"])
    two = _dfkd([*common, "--out", tmp_path / "two"], processes=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # rank 0 speaks for the run
    a, b = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["images_synthesized"] == a["images_synthesized"] and b["options"]["batch_size"] == 64
    assert abs(a["student_accuracy"] - b["student_accuracy"]) < 0.1
    assert not list((tmp_path / "two").glob("*.tmp"))
    # an unfinished two-process run continues with two processes only
    for name in ("report.md", "summary.json"):
        (tmp_path / "two" / name).unlink()
    refused = _dfkd(["distill", "--resume", tmp_path / "two", "--quiet"])
    assert refused.returncode == 3 and "written by 2 process(es), this run has 1" in refused.stderr
    assert "--nproc_per_node=2" in refused.stderr
    resumed = _dfkd(["distill", "--resume", tmp_path / "two", "--quiet"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["student_accuracy"] == b["student_accuracy"]
    # a global batch the processes cannot share is refused before anything is written
    odd = _dfkd([*common, "--out", tmp_path / "odd", "batch_size=63"], processes=2)
    assert odd.returncode != 0 and not (tmp_path / "odd").exists()
    assert "batch_size 63 cannot be split over 2 processes; use a multiple of 2, e.g. 62 or 64" in odd.stderr
