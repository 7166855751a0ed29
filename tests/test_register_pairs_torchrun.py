"""``monai-icon register-pairs`` under ``torchrun`` (2 CPU processes, gloo): each pair done once, the same files
and summary as one process, a failing rank named with its pair while the other ranks finish theirs, and ``--resume``
continuing after it."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_icon.apps import save_registration_model
from monai_icon.networks import multistep_registration

from conftest import ROOT

TINY = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
SHAPE = (16, 16, 8)
NUM_PAIRS = 5


def _nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    model = save_registration_model(d / "m.pt", multistep_registration(**TINY),
                                    {"_target_": "monai_icon.networks.multistep_registration", **TINY},
                                    spatial_size=SHAPE)
    pairs = []
    for i in range(NUM_PAIRS):
        images = [rng.random(SHAPE).astype(np.float32) for _ in range(2)]
        files = {f"{role}_image": _nifti(d / f"{i}_{role}.nii.gz", image)
                 for role, image in zip(("fixed", "moving"), images)}
        files.update({f"{role}_label": _nifti(d / f"{i}_{role}_label.nii.gz", (image * 3).round().astype(np.uint8))
                      for role, image in zip(("fixed", "moving"), images)})
        pairs.append({**files, "pair_id": f"p{i}"})
    datalist = d / "pairs.json"
    datalist.write_text(json.dumps({"pairs": pairs}))
    return {"dir": d, "model": str(model), "datalist": str(datalist), "pairs": pairs}


def _run(args, nproc=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "monai_icon"] if nproc else [sys.executable, "-m", "monai_icon"]
    return subprocess.run([*launcher, "register-pairs", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _comparable(summary):
    """A summary without what differs between runs (seconds, folders of the written files)."""
    pairs = [{k: v for k, v in p.items() if k not in ("seconds", "written")} for p in summary["pairs"]]
    mean = {k: v for k, v in summary["mean"].items() if k != "seconds_per_pair"}
    return mean, pairs


def test_two_processes_write_the_same_files_and_summary_as_one(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--datalist", inputs["datalist"], "--model", inputs["model"], "--io-mode", "residual", "--io-steps", "2"]
    single = _run([*args, "--output-dir", str(one)])
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run([*args, "--output-dir", str(two)], nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "5 pairs" in double.stdout and "2 processes" in double.stdout, double.stdout
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len(names) == NUM_PAIRS * 4 + 1  # warped, ddf, transform, warped labels per pair + summary.json
    for name in names:
        if name.endswith(".nii.gz"):
            a, b = (np.asarray(nib.load(folder / name).dataobj, dtype=np.float64) for folder in (one, two))
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    s1, s2 = (json.loads((folder / "summary.json").read_text()) for folder in (one, two))
    mean1, pairs1 = _comparable(s1)
    mean2, pairs2 = _comparable(s2)
    assert [p["pair_id"] for p in pairs2] == [f"p{i}" for i in range(NUM_PAIRS)]  # the datalist's order
    assert mean1.keys() == mean2.keys() and all(abs(mean1[k] - mean2[k]) < 1e-6 for k in mean1)
    for p1, p2 in zip(pairs1, pairs2):
        assert p1["dice"] == pytest.approx(p2["dice"]) and p1["folds_percent"] == pytest.approx(p2["folds_percent"])
        assert np.allclose(p1["mean_displacement_mm"], p2["mean_displacement_mm"], atol=1e-6)
        assert np.allclose(p1["io_losses"], p2["io_losses"], atol=1e-5)


def test_a_failing_rank_is_named_and_resume_finishes_the_rest(inputs, tmp_path):
    out = tmp_path / "out"
    broken = tmp_path / "broken.nii.gz"
    _nifti(broken, np.full(SHAPE, np.nan, dtype=np.float32))
    pairs = [dict(p) for p in inputs["pairs"]]
    pairs[0]["moving_image"] = str(broken)  # rank 0's first pair: rank 1 still registers its pairs
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps({"pairs": pairs}))
    args = ["--datalist", str(datalist), "--model", inputs["model"], "--output-dir", str(out), "--resume"]
    failed = _run(args, nproc=2)
    assert failed.returncode != 0
    assert "pair p0" in failed.stderr and "[rank 0 of 2]" in failed.stderr and "broken.nii.gz" in failed.stderr, \
        failed.stderr[-3000:]
    assert "rank 1 of 2 registered its pairs" in failed.stderr and "--resume" in failed.stderr, failed.stderr[-3000:]
    assert not (out / "summary.json").exists() and not list(out.rglob("*partial*"))
    assert not list(out.glob("p[024]_*"))  # rank 0 stopped at its first pair
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("p[13]_*")}
    assert len(done_before) == 8, sorted(done_before)  # rank 1 finished: 4 files each of p1 and p3
    pairs[0]["moving_image"] = inputs["pairs"][0]["moving_image"]  # the broken file replaced
    datalist.write_text(json.dumps({"pairs": pairs}))
    resumed = _run(args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(f"p{i}: done by an earlier run" in resumed.stdout for i in (1, 3)), resumed.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("p[13]_*")} == done_before  # not registered again
    summary = json.loads((out / "summary.json").read_text())
    assert [p["pair_id"] for p in summary["pairs"]] == [f"p{i}" for i in range(NUM_PAIRS)]
    assert summary["mean"]["scored_pairs"] == NUM_PAIRS
