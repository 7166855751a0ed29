"""The reproduction scripts on a tiny setting (the full sweep is kept out of CI)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fig5_no_network  # noqa: E402
import table1  # noqa: E402


def test_every_table1_setting_comes_from_one_grid_with_the_papers_optimiser():
    grid = table1.load_grid()
    assert tuple(grid["networks"]) == table1.NETWORKS and tuple(grid["lambdas"]) == table1.LAMBDAS
    configs = [table1.load_config(d, n, lam, {}) for d in grid["datasets"] for n in grid["networks"]
               for lam in grid["lambdas"]]
    assert len(configs) == 2 * 4 * 6
    for config in configs:
        assert config["lr"] == 1e-4 and config["batch_size"] == 128 and config["optimizer"] == "adam"
        assert config["steps"] < config["paper_steps"] == 18750
    assert table1.load_config("mnist", "unet", 512, {"steps": 7})["steps"] == 7
    with pytest.raises(ValueError, match="not in the grid"):
        table1.load_config("mnist", "unet", 100, {})


def test_table1_runner_tiny_setting_and_resume(tmp_path, capsys):
    args = [
        "--datasets",
        "triangles",
        "--networks",
        "unet",
        "convonly",
        "--lambdas",
        "64",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--test-pairs",
        "8",
        "--image-size",
        "32",
        "--epoch-steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    results = table1.main(args)
    assert set(results) == {("triangles", "unet", 64), ("triangles", "convonly", 64)}
    for result in results.values():
        assert 0 <= result["dice"] <= 1 and result["folds"] >= 0 and result["steps"] == 4
    table = (tmp_path / "table1.md").read_text()
    assert "| 64 |" in table and "(0.98)" in table  # the paper's U-Net Dice at lambda 64 stands beside ours
    assert (tmp_path / "fig6_triangles.png").stat().st_size > 1000
    setting = tmp_path / "triangles_unet_lambda64"
    assert (setting / "checkpoints").is_dir() and json.loads((setting / "result.json").read_text())["network"] == "unet"
    # a finished setting is not trained again
    mtime = (setting / "result.json").stat().st_mtime_ns
    table1.main(args)
    assert (setting / "result.json").stat().st_mtime_ns == mtime
    # ... and is not passed off as the result of another budget
    with pytest.raises(ValueError, match="another budget.*steps"):
        table1.main([a if a != "4" else "5" for a in args])
    # --report-only collects what has finished and trains nothing
    report = table1.main(
        args[:2] + ["--networks", "unet", "encdec", "--lambdas", "64", "128"] + args[7:] + ["--report-only"]
    )
    assert (
        set(report) == {("triangles", "unet", 64)}
        and report[("triangles", "unet", 64)]["dice"] == results[("triangles", "unet", 64)]["dice"]
    )
    assert (
        not (tmp_path / "triangles_encdec_lambda64").exists() and not (tmp_path / "triangles_unet_lambda128").exists()
    )
    table = (tmp_path / "table1.md").read_text()
    assert "| 128 | – (0.98) | – (1.59) | – (0.90) | – (2.71) |" in table


def test_table1_runner_resumes_an_interrupted_setting(tmp_path):
    config = table1.load_config("mnist", "convonly", 128, {"steps": 6, "batch_size": 4, "test_pairs": 4})
    out = tmp_path / "setting"
    partial = dict(config, steps=2)  # as if stopped after the first checkpoint (2 of 6 steps)
    table1.run_setting(partial, out, table1.torch.device("cpu"), 2, None)
    (out / "result.json").unlink()
    result = table1.run_setting(config, out, table1.torch.device("cpu"), 2, None)
    assert result["steps"] == 6
    checkpoint = table1.torch.load(table1.latest_checkpoint(out / "checkpoints"), weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 6


def test_fig5_script_tiny(tmp_path):
    args = [
        "--image-size",
        "32",
        "--direct-steps",
        "5",
        "--direct-seeds",
        "2",
        "--unet-steps",
        "4",
        "--unet-batch-size",
        "2",
        "--unet-test-pairs",
        "4",
        "--epoch-steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    summaries = fig5_no_network.main(args)
    assert [s["method"].split(",")[0] for s in summaries] == ["direct", "direct", "U-Net (population)"]
    assert (tmp_path / "fig5.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "fig5.json").read_text())
    assert len(saved["results"]) == 3 and all(r["folds"] >= 0 and r["jacobian_std"] >= 0 for r in saved["results"])
    for direct in saved["results"][:2]:  # every seed is reported; the figure's run is seed 0
        assert len(direct["seeds"]) == 2 and direct["seeds"][0]["folds"] == direct["folds"]
        assert direct["seeds"][0]["jacobian_std"] != direct["seeds"][1]["jacobian_std"]
    # the population U-Net is trained by the Table 1 runner: checkpointed, evaluated, reported
    run_dir = tmp_path / "unet_population_lambda2048_size32"
    population = saved["unet_population"]
    assert population == json.loads((run_dir / "result.json").read_text())
    assert population["steps"] == 4 and population["lmbda"] == 2048 and 0 <= population["dice"] <= 1
    checkpoint = table1.latest_checkpoint(run_dir / "checkpoints")
    assert table1.torch.load(checkpoint, weights_only=False)["trainer"]["iteration"] == 4
    # a rerun reuses the finished U-Net (same maps), and so does passing its checkpoint
    mtime = (run_dir / "result.json").stat().st_mtime_ns
    assert fig5_no_network.main(args)[2] == summaries[2]
    assert (run_dir / "result.json").stat().st_mtime_ns == mtime
    from_checkpoint = fig5_no_network.main(args[:-1] + [str(tmp_path / "again"), "--unet-checkpoint", str(checkpoint)])
    assert from_checkpoint[2] == summaries[2]
    assert json.loads((tmp_path / "again" / "fig5.json").read_text())["unet_population"] is None


def test_recipe2d_with_augmentation_and_the_generalisation_gap_tiny(tmp_path):
    import generalisation_gap2d
    import recipe2d

    model = tmp_path / "model.pt"
    record = recipe2d.main(["--name", "tiny", "--steps", "4", "--batch-size", "4", "--val-pairs", "4", "--test-pairs",
                            "4", "--eval-every", "2", "--lr", "1e-3", "--lmbda-start", "16", "--lmbda-ramp", "0.5",
                            "--augment-rotate", "10", "--augment-scale", "0.1", "--augment-translate", "2", "--test",
                            "--save-model", str(model), "--out", str(tmp_path)])
    assert [p["step"] for p in record["curve"]] == [2, 4] and record["args"]["augment_rotate"] == 10
    assert record["curve"][0]["lmbda"] < record["curve"][1]["lmbda"] <= 512
    assert json.loads((tmp_path / "tiny.json").read_text())["test"]["dice"] == record["test"]["dice"]
    gap = generalisation_gap2d.main([str(model), "--pairs", "4"])[str(model)]
    assert set(gap) == {"train", "val", "test"} and all(0 <= v["dice"] <= 1 for v in gap.values())


def test_recipe2d_two_step_network_and_its_generalisation_gap_tiny(tmp_path):
    """``--two-step`` trains two U-Nets composed; the generalisation-gap script recognises its state dict."""
    import generalisation_gap2d
    import recipe2d

    model = tmp_path / "two.pt"
    record = recipe2d.main(["--name", "two", "--steps", "2", "--batch-size", "4", "--val-pairs", "4", "--test-pairs",
                            "4", "--eval-every", "2", "--two-step", "--save-model", str(model), "--out", str(tmp_path)])
    assert record["args"]["two_step"] and [p["step"] for p in record["curve"]] == [2]
    state = torch.load(model, weights_only=True)
    assert any(k.startswith("block.first.") for k in state) and any(k.startswith("block.second.") for k in state)
    gap = generalisation_gap2d.main([str(model), "--pairs", "4"])[str(model)]
    assert all(0 <= v["dice"] <= 1 for v in gap.values())


def test_io3d_study_scores_validation_pairs_with_the_register_files_path(tmp_path):
    """experiments/io3d.py on a tiny identity model: fine similarity on coarse fields with a chosen LNCC window; with
    0 steps the identity model reproduces the unregistered Dice; one JSON row per run is appended."""
    import io3d
    from conftest import labelled_pairs_and_tiny_model
    from monai_icon.metrics import label_dice

    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 1, (16, 16, 8))
    common = ["--datalist", str(datalist), "--model", str(model), "--key", "test_pairs", "--out", str(tmp_path / "o")]
    still = io3d.main(common + ["--steps", "0", "--tag", "zero", "--levels", "1"])
    moved = io3d.main(common + ["--steps", "4", "--fine-steps", "2", "--io-size", "32,32,16", "--io-field-size",
                                "16,16,8", "--kernel", "5", "--tag", "fine"])
    pair = json.loads(datalist.read_text())["test_pairs"][0]
    import nibabel as nib
    import numpy as np

    read = [torch.as_tensor(np.rint(nib.load(str(datalist.parent / pair[k])).get_fdata()).astype(np.int64))
            for k in ("moving_label", "fixed_label")]
    before = label_dice(*read)
    assert still["mean_dice"] == pytest.approx(float(np.nanmean(list(before.values()))), abs=1e-6)
    assert 0 <= moved["mean_dice"] <= 1 and moved["settings"]["kernel"] == 5
    assert [r["tag"] for r in json.loads((tmp_path / "o" / "io3d.json").read_text())] == ["zero", "fine"]
    with pytest.raises(SystemExit):
        io3d.main(common + ["--similarity", "mse", "--kernel", "5", "--tag", "bad"])
