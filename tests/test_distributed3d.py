"""The 3D bundle in several processes (``multi_gpu_train.yaml`` under ``torchrun``, gloo on CPU) and the helpers of
``monai_icon.engines.distributed`` it uses.

The equivalence tests fix the training-time randomness so that one process and two can be compared step for step:
the training pairs are a fixed list (``--train#dataset#seed 0``), the inverse consistency is evaluated on the grid
(``--sigma 0``: no random jitter), augmentation is off (the default). They train with SGD: Adam divides each update by
the gradient's running RMS, so a parameter whose true gradient is zero (a convolution's bias followed by batch norm,
which removes it) takes steps of +-lr from float rounding alone, in one process as in two; SGD keeps every weight
comparable. Tolerance: 1e-5 on every weight and batch norm statistic (measured: about 2e-7) while the zero-initialised
output layers move by more than 1e-3; without the global batch norm the difference is about 1e-2.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_bundle
from monai_icon.data import build_knee_datalist, write_datalist, write_synthetic_knees
from monai_icon.engines import distributed

CONFIGS = ROOT / "bundle" / "knee3d_icon" / "configs"
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------- the helpers alone
def test_per_rank_batch_and_contiguous_shards():
    assert distributed.per_rank_batch(8, 4) == 2 and distributed.per_rank_batch("4", 1) == 4
    with pytest.raises(ValueError, match="give a multiple of 4"):
        distributed.per_rank_batch(6, 4)
    parts = [distributed.shard_range(7, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(distributed.ShardSampler(list("abc"), r, 2)) for r in range(2)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="2 evaluation items cannot be shared by 3 processes"):
        distributed.ShardSampler([1, 2], 0, 3)


def test_one_process_needs_no_process_group():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.rank_seed("5") == 5 and not distributed.init_process_group("cpu")
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    assert distributed.distributed_network(net, "cpu", True, "true") is net  # no DDP, no conversion
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert distributed.unwrap(net) is net
    distributed.destroy_process_group()  # nothing to end


def test_the_multi_process_config_is_short_and_runs_as_one_process():
    """Its expressions stay short (the logic is in monai_icon.engines.distributed); parsed without torchrun it is
    the one-process configuration: the whole batch in this process, the network unwrapped."""
    from monai.bundle import ConfigParser

    text = (CONFIGS / "multi_gpu_train.yaml").read_text()
    config = yaml.safe_load(text)

    def expressions(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from expressions(v)
        elif isinstance(value, list):
            for v in value:
                yield from expressions(v)

    for expression in (e for e in expressions(config) if e.startswith("$")):
        assert len(expression) <= 120 and "lambda" not in expression, expression
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in ("common.yaml", "stage1.yaml", "multi_gpu_train.yaml")])
    parser.update({"architecture#encoder_channels": [4, 8], "architecture#decoder_channels": [8, 4],
                   "batch_size": 4})
    assert parser.get_parsed_content("main_process") is True and parser.get_parsed_content("train_seed") == 0
    assert parser.get_parsed_content("train#dataloader#batch_size") == 4
    network = parser.get_parsed_content("network")
    assert network is parser.get_parsed_content("trained_network")
    assert not isinstance(network, torch.nn.parallel.DistributedDataParallel)


def _batchnorm_worker(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    x = torch.load(f"{folder}/x.pt")[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
    weight = torch.load(f"{folder}/w.pt")[2 * rank: 2 * rank + 2]
    bn = distributed.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(3)), "cpu")
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    y = bn(x)
    (y * weight).sum().backward()
    grad_w = bn[0].weight.grad.clone()
    torch.distributed.all_reduce(grad_w)
    torch.save({"y": y.detach(), "grad_x": x.grad, "grad_w": grad_w, "running_var": bn[0].running_var,
                "running_mean": bn[0].running_mean, "type": type(bn[0]).__name__}, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_batch_norm_over_two_processes_is_batch_norm_of_the_global_batch(tmp_path):
    """Each of two gloo processes normalises two of four volumes: outputs, input and weight gradients and running
    statistics equal those of one BatchNorm3d on all four (float rounding)."""
    x, w = torch.randn(4, 3, 4, 5, 2) * 3 + 1, torch.randn(4, 3, 4, 5, 2)
    torch.save(x, tmp_path / "x.pt")
    torch.save(w, tmp_path / "w.pt")
    torch.multiprocessing.spawn(_batchnorm_worker, args=(str(tmp_path),), nprocs=2)
    reference = torch.nn.BatchNorm3d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    xr = x.clone().requires_grad_(True)
    y = reference(xr)
    (y * w).sum().backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert {p["type"] for p in parts} == {"DistributedBatchNorm"}
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]), xr.grad, atol=1e-5, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["grad_w"], reference.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p["running_mean"], reference.running_mean)
        torch.testing.assert_close(p["running_var"], reference.running_var)


# ------------------------------------------------------------------------------------ the bundle under torchrun
def torchrun(*args: str, timeout: float = 300, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if popen:  # its own process group, so that the test can end everything it started
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                    f"{proc.stderr[-6000:]}", pytrace=False)
    return proc.stdout + proc.stderr


def configs(*names: str) -> str:
    return str([str(CONFIGS / n) for n in names])


def options(data: Path, root: Path, **extra: str) -> list[str]:
    values = {
        "--datalist": str(data / "datalist.json"), "--output_root": str(root), "--full_size": "[16,16,8]",
        "--architecture#encoder_channels": "[4,8]", "--architecture#decoder_channels": "[8,4]",
        "--batch_size": "4", "--iterations_per_epoch": "2", "--epochs": "2", "--val_pairs": "3",
        "--cpu_backend": "$monai_icon.backend.CPUBackend('auto', fast_sampler=False, compiled_lncc=False)",
        "--fold_threshold": "-1",
        # the randomness fixed (module docstring) and SGD
        "--train#dataset#seed": "0", "--sigma": "0", "--optimizer#_target_": "torch.optim.SGD",
        "--learning_rate": "0.01", **{f"--{k}": v for k, v in extra.items()},
    }
    return [item for pair in values.items() for item in pair]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("knees3d_dist")
    write_synthetic_knees(root / "knees", num_subjects=6, shape=(32, 32, 16), spacing=(4.2, 4.2, 7.5))
    write_datalist(build_knee_datalist(root / "knees", 0.3, num_test_pairs=3, relative_to=root), root / "datalist.json")
    return root


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    """Stage 1, 2 epochs of 2 steps of a global batch of 4: in one process, and in two of 2 pairs each."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    start = time.perf_counter()
    log_one = run_bundle("run", "--config_file", configs("common.yaml", "stage1.yaml"), *options(data, one)).stdout
    seconds_one = time.perf_counter() - start
    start = time.perf_counter()
    log_two = torchrun("--config_file", configs("common.yaml", "stage1.yaml", "multi_gpu_train.yaml"),
                       *options(data, two))
    print(f"stage 1, 4 steps: one process {seconds_one:.1f} s, torchrun with 2 {time.perf_counter() - start:.1f} s")
    return one, two, log_one, log_two


def max_difference(a: Path, b: Path) -> float:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


def summary(log: str) -> str:
    return log[log.index("== ICON 3D"):].split("seconds per pair")[0]


def files(root: Path) -> list[str]:
    """Every file under ``root``, TensorBoard event files by their folder only (their names carry host and pid)."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "EVENTS", str(p.relative_to(root)))
                  for p in root.rglob("*") if p.is_file())


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(stage1):
    one, two, log_one, log_two = stage1
    models_one, models_two = one / "stage1" / "models", two / "stage1" / "models"
    difference = max_difference(models_one / "model.pt", models_two / "model.pt")
    print(f"largest weight difference, one vs two processes: {difference:.2e}")
    assert difference < TOLERANCE
    moved = torch.load(models_one / "model.pt", weights_only=True)
    assert all(float(v.abs().max()) > 1e-3 for k, v in moved.items() if k.endswith("out.weight"))  # zero at start
    # the same lambda (4 steps of +0.1), the same validation metrics (the 3 pairs split 2 + 1 and gathered)
    assert "lambda now 1.40" in log_one and summary(log_one) == summary(log_two)
    # rank 0 alone wrote: the same files as one process (no second set of event files, checkpoints or figures),
    # one summary printed
    assert files(one) == files(two) and log_two.count("== ICON 3D stage1: last validation") == 1
    assert len(list((models_two / "checkpoints").glob("*.pt"))) == 1


@pytest.fixture(scope="module")
def stage2(data, stage1):
    one, two, _, _ = stage1
    log_one = run_bundle("run", "--config_file", configs("common.yaml", "stage2.yaml"),
                         *options(data, one, epochs="1")).stdout
    log_two = torchrun("--config_file", configs("common.yaml", "stage2.yaml", "multi_gpu_train.yaml"),
                       *options(data, two, epochs="1"))
    return one, two, log_one, log_two


def test_stage_two_with_its_frozen_steps_matches_too(stage2):
    one, two, log_one, log_two = stage2
    models_one, models_two = one / "stage2" / "models", two / "stage2" / "models"
    difference = max_difference(models_one / "model.pt", models_two / "model.pt")
    print(f"stage 2: largest weight difference, one vs two processes: {difference:.2e}")
    assert difference < TOLERANCE and summary(log_one) == summary(log_two)
    exported = torch.load(models_two / "registration_model.pt", weights_only=True)
    assert exported["settings"]["lmbda"] == pytest.approx(1.4 + 2 * 0.8)  # stage 1's lambda, +0.8 per step
    assert not any(k.startswith("module.") for k in exported["state_dict"])  # the network, not its DDP wrapper


def test_evaluation_in_two_processes_writes_the_files_of_one(data, stage2):
    """evaluate.yaml + multi_gpu_train.yaml: the 3 test pairs split 2 + 1, the per-pair CSV files in the pairs'
    order and the summary as in one process (all but the seconds per pair)."""
    _, two, _, _ = stage2
    args = options(data, two)
    run_bundle("run", "--config_file", configs("common.yaml", "stage2.yaml", "evaluate.yaml"), *args,
               "--output_dir", str(two / "eval_one"))
    log = torchrun("--config_file", configs("common.yaml", "stage2.yaml", "evaluate.yaml", "multi_gpu_train.yaml"),
                   *args, "--output_dir", str(two / "eval_two"))
    assert log.count("evaluation on 3 test pairs") == 1
    assert files(two / "eval_one") == files(two / "eval_two")
    for table in sorted((two / "eval_one").glob("*.csv")):
        if not table.name.startswith("val_time") and table.name != "metrics.csv":
            assert table.read_text() == (two / "eval_two" / table.name).read_text(), table.name
    rows = [dict(csv.reader(open(two / d / "metrics.csv"))) for d in ("eval_one", "eval_two")]
    rows = [{k: v for k, v in r.items() if k != "val_time"} for r in rows]
    assert rows[0] == rows[1] and "val_label_dice" in rows[0]


def worker_pids(pid: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes of the torchrun process ``pid``."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = {}
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = int(child)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc")
def test_a_killed_rank_leaves_a_checkpoint_the_next_torchrun_resumes_from(data, tmp_path):
    """Rank 1 is killed once rank 0 has written a resume checkpoint; torchrun stops the run. Started again with the
    same command (one more epoch than the checkpoint holds), both ranks resume from it and finish."""
    args = ["--config_file", configs("common.yaml", "stage1.yaml", "multi_gpu_train.yaml"),
            *options(data, tmp_path, iterations_per_epoch="1", val_interval="1000")]
    checkpoints = tmp_path / "stage1" / "models" / "checkpoints"
    proc = torchrun(*args, "--epochs", "1000", popen=True)
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("*.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the test could kill it"
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in output
    assert not (tmp_path / "stage1" / "models" / "registration_model.pt").exists()
    saved = next(checkpoints.glob("*.pt"))
    epoch = torch.load(saved, weights_only=True)["trainer"]["iteration"]  # one iteration per epoch
    assert epoch >= 1
    log = torchrun(*args, "--epochs", str(epoch + 1))
    assert log.count(f"Restored all variables from {saved}") == 2  # both ranks
    assert torch.load(next(checkpoints.glob("*.pt")), weights_only=True)["trainer"]["iteration"] == epoch + 1
    assert (tmp_path / "stage1" / "models" / "registration_model.pt").is_file()
