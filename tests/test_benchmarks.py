"""The benchmark scripts compare like with like (timings themselves are never asserted)."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import grid_sample_bench  # noqa: E402


@pytest.mark.parametrize("name", ["gather", "slices-2d-float64", "slices-2d-float32", "planar"])
def test_grid_sample_alternatives_sample_like_interpolate(name):
    torch.manual_seed(0)
    field = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64)
    points = torch.rand(2, 3, 300, dtype=torch.float64) * 1.2 - 0.1  # some beyond the border
    grad_out = torch.randn(2, 3, 300, dtype=torch.float64)
    expected = grid_sample_bench.forward_backward(grid_sample_bench.METHODS["interpolate"], field, points, grad_out)
    got = grid_sample_bench.forward_backward(grid_sample_bench.METHODS[name], field, points, grad_out)
    tol = 1e-4 if name.endswith("float32") else 1e-10  # float32 coordinates on the stacked slices
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


def test_per_point_costs_compares_2d_and_3d_at_the_same_point_count():
    torch.manual_seed(0)
    assert grid_sample_bench._square_shape(368640) == (607, 607)
    costs = grid_sample_bench.per_point_costs((4, 5, 6), (8, 10, 12), repeats=1)
    assert set(costs) == {"3D", "2D"}
    assert all(ns > 0 for ns in costs.values())


def test_tensor_memory_peak_counts_live_storages_once():
    import icon_bench

    mib = 2**20
    kept = torch.ones(mib // 4)  # created before: never counted
    with icon_bench.TensorMemoryPeak() as tracker:
        a = torch.ones(mib // 4)  # 1 MiB
        b = torch.ones(mib // 4)
        del b  # freed: 1 MiB live
        a.add_(1)  # in place and a view: no new storage
        view = a[:10]
        c = torch.ones(mib // 2) + kept.sum()  # 2 MiB (the sum's scalar output adds 4 bytes for a while)
        w = torch.ones(mib // 4, requires_grad=True)  # 1 MiB
        (w * c[: mib // 4]).sum().backward()  # the product and the gradient: 2 MiB more at most
    assert tracker.live == pytest.approx(5 * mib, abs=64)  # a, c, w and w.grad
    assert 5 * mib <= tracker.peak <= 6 * mib + 64
    del a, c, w
    assert tracker.live == mib  # the view keeps a's storage alive
    del view
    assert tracker.live == 0


def test_memory_cell_reports_tensors_and_rss_on_cpu():
    import icon_bench

    case = icon_bench.Case("tiny", 2, (32, 32), 2)
    cell = icon_bench.memory_cell(case, torch.device("cpu"))
    assert " MiB = " in cell and "(RSS " in cell
    step, bare = (float(v) for v in cell.split(" MiB")[0].split(" / "))
    assert step > 0 and bare > 0


def test_similarity_loop_reports_both_similarities():
    import icon_bench

    result = icon_bench.similarity_loop_overheads(icon_bench.Case("tiny", 2, (32, 32), 2), torch.device("cpu"), 1, 2)
    assert set(result) == {"mse", "lncc"} and all(v > 0 for v in result.values())


def test_measure_case_times_step_bare_and_inference():
    import icon_bench

    t_step, t_bare, ratio, t_infer, mem = icon_bench.measure_case(
        icon_bench.Case("tiny", 2, (32, 32), 2), torch.device("cpu"), 1, 2, memory=False
    )
    assert min(t_step, t_bare, ratio, t_infer) > 0 and mem == ""


def test_stage_two_case_trains_only_the_full_resolution_step():
    import icon_bench

    case = icon_bench.Case("stage 2", 3, (64, 64, 32), 1, "mse", stage=2)
    built = icon_bench.build(case, torch.device("cpu"))
    nets, optimizer = built[1], built[3]
    assert len(nets) == 3 and [any(p.requires_grad for p in n.parameters()) for n in nets] == [False, False, True]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in nets[2].parameters()}
    step, bare, infer = icon_bench.make_step(case, torch.device("cpu"), built)
    for run in (step, bare):
        before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
        run()
        changed = [any(not torch.equal(v, net.state_dict()[k]) for k, v in b.items()) for net, b in zip(nets, before)]
        assert changed == [False, False, True]  # the frozen half-resolution U-Nets keep weights and statistics
    infer()
    with pytest.raises(ValueError, match="stage"):
        icon_bench.Case("2D stage 2", 2, (32, 32), 1, stage=2)


def test_paper_sizes_report_rows_for_the_chosen_stages():
    import argparse

    import icon_bench

    args = argparse.Namespace(device="cpu", quick=False, warmup=0, repeats=1, shape=[64, 64, 32], stages=[2],
                              max_batch=1, no_memory=True)
    report = icon_bench.run_paper_sizes(args)
    rows = [line for line in report.splitlines() if line.startswith("| 3D")]
    assert len(rows) == 2 and all("stage 2" in row and "64x64x32" in row for row in rows)
    assert [row.split("|")[2].strip() for row in rows] == ["mse", "lncc"]
    assert all(row.split("|")[3].strip() == "1" for row in rows)  # batch 1 fits


def test_amp_variant_runs_with_the_loss_in_float32():
    import icon_bench

    case = icon_bench.Case("tiny", 2, (32, 32), 2, "lncc")
    amp, eager = (icon_bench.make_variant_step(case, torch.device("cpu"), v) for v in ("amp", "eager"))
    loss_amp, loss_eager = amp(0), eager(0)
    assert loss_amp == pytest.approx(loss_eager, rel=1e-2)  # same weights and jitter; bfloat16 networks only
    with pytest.raises(ValueError, match="unknown variant"):
        icon_bench.make_variant_step(case, torch.device("cpu"), "fp8")


def test_syn_vs_icon_scores_both_methods_with_one_dice_function(tmp_path):
    """The ICON side of the SyN comparison on a tiny model (SyN itself needs antspyx, a benchmark-only
    dependency): warped labels on the fixed grid, Dice by label_dice, a results table."""
    import json

    import numpy as np

    import syn_vs_icon
    from conftest import labelled_pairs_and_tiny_model

    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 0], [2, 2, 2]])
    dice = syn_vs_icon.label_dice(a, b, [1, 2, 3])
    assert dice[1] == pytest.approx(2 / 3) and dice[2] == pytest.approx(0.8) and np.isnan(dice[3])
    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 1, (16, 16, 8))
    results = syn_vs_icon.main(["--datalist", str(datalist), "--model", str(model), "--no-syn", "--threads", "1",
                                "--out", str(tmp_path / "out")])
    rows = results["rows"]
    # an untrained (zero-initialised) model is the identity: it reproduces the unregistered Dice exactly
    assert rows["icon"]["mean_dice"] == pytest.approx(rows["unregistered"]["mean_dice"], abs=1e-6)
    assert rows["icon"]["folds_percent"] == 0.0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"].keys() == rows.keys()


def test_make_mni_pairs_builds_labelled_deformed_pairs_from_a_wheel(tmp_path):
    """The generalisation data from a (here: fake, tiny) nilearn wheel: template pooled, grey/white matter
    probability maps thresholded at 0.5 into labels 1/2, deformed copies and their test pairs."""
    import json
    import zipfile

    import nibabel as nib
    import numpy as np

    import make_mni_pairs

    rng = np.random.default_rng(0)
    wheel = tmp_path / "nilearn-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for key, member in make_mni_pairs.MEMBERS.items():
            data = rng.random((20, 24, 16)).astype(np.float32)
            path = tmp_path / f"{key}.nii.gz"
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
            archive.write(path, member)
    datalist = make_mni_pairs.main(["--wheel", str(wheel), "--out", str(tmp_path / "mni"), "--copies", "3",
                                    "--pairs", "2"])
    content = json.loads(datalist.read_text())
    assert len(content["test_pairs"]) == 2 and content["labels"]["1"] == "grey_matter"
    label = nib.load(tmp_path / "mni" / "mni152_gm_wm.nii.gz")
    assert label.shape == (10, 12, 8) and set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    np.testing.assert_allclose(np.diag(label.affine)[:3], [2.0, 2.0, 2.0])
    with pytest.raises(FileNotFoundError, match="wheel not found"):
        make_mni_pairs.main(["--wheel", str(tmp_path / "missing.whl")])


def test_oracle_t1head_scores_the_exact_inverse_map_of_the_demo_copies(tmp_path):
    """The known-answer ceiling of the T1-head demo: the regenerated deformations reproduce the stored label files,
    their fixed-point inverse is exact to a small residual, the exact map beats no registration by a wide margin
    (only nearest-neighbour resampling of the labels is lost), and a wrong seed is detected."""
    import json

    import oracle_t1head
    from monai_icon.data import write_deformed_copies

    records = write_deformed_copies(tmp_path / "volumes", num_copies=3, deformation_mm=6.0, seed=5)
    pairs = [{"moving_image": f"volumes/{Path(records[m]['image']).name}",
              "moving_label": f"volumes/{Path(records[m]['label']).name}",
              "fixed_image": f"volumes/{Path(records[f]['image']).name}",
              "fixed_label": f"volumes/{Path(records[f]['label']).name}", "pair_id": f"{m}_to_{f}"}
             for m, f in ((0, 2), (1, 0))]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test_pairs": pairs}))
    out = tmp_path / "oracle.json"
    summary = oracle_t1head.main(["--datalist", str(datalist), "--key", "test_pairs", "--num-copies", "3",
                                  "--seed", "5", "--out", str(out)])
    assert summary["pairs"] == 2 and summary["exact_map"] > summary["before"] + 0.15
    rows = json.loads(out.read_text())["rows"]
    assert all(r["inverse_residual_voxels"] < 1e-2 for r in rows)
    with pytest.raises(RuntimeError, match="regenerated labels differ"):
        oracle_t1head.main(["--datalist", str(datalist), "--key", "test_pairs", "--num-copies", "3", "--seed", "6"])


def test_step3d_bench_variants_compute_the_same_step():
    """channels-last changes the memory layout, not the step: the first step's loss agrees to rounding; the
    resampled map is a different (interpolated) map, whose loss is close for a near-identity network."""
    import step3d_bench

    tiny = {"encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    losses = {(f, r, cl): step3d_bench.make_step((16, 16, 8), f, r, cl, 2, tiny)()
              for f, r, cl in [(1, False, False), (1, False, True), (2, False, False), (2, False, True),
                               (2, True, False), (2, True, True)]}
    for factor, resample in [(1, False), (2, False), (2, True)]:
        assert losses[(factor, resample, True)] == pytest.approx(losses[(factor, resample, False)], rel=1e-5)
    assert losses[(2, True, False)] == pytest.approx(losses[(2, False, False)], rel=0.05)
    assert step3d_bench.variant_name("fine128", True, True) == "fine128, resample, channels-last"
    unshuffled = step3d_bench.make_step((16, 16, 8), 2, True, True, 2, tiny, architecture=step3d_bench.UNSHUFFLED)()
    # near the identity either way: the same fine images compared, so nearly the same first loss
    assert math.isfinite(unshuffled) and unshuffled == pytest.approx(losses[(2, True, True)], rel=0.05)
    assert step3d_bench.variant_name("fine128", True, True, step3d_bench.UNSHUFFLED).endswith("unshuffle inputs")
    assert step3d_bench.variant_name("fine128", True, True, step3d_bench.THREE_STEPS).endswith(", 3 steps")


def test_allocator_bench_measures_each_setting_in_its_own_process():
    import allocator_bench

    from monai_icon.cpu_allocator import _glibc

    tuned = allocator_bench.measure("tuned", 1, 1, (16, 16, 8))
    default = allocator_bench.measure("default", 1, 1, (16, 16, 8))
    assert tuned["applied"] is (_glibc() is not None) and default["applied"] is False
    assert tuned["step"] > 0 and default["step"] > 0 and tuned["faults"] >= 0


def test_resample_bench_compares_resizings_against_float64_and_layouts_by_value():
    import resample_bench

    rows = resample_bench.bench({"small": resample_bench.resize_case((3, 4, 5), (7, 9, 4))}, rounds=1)
    assert [r["variant"] for r in rows] == ["F.interpolate", "resize_linear"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert all(r["max_diff"] < 1e-5 for r in rows)  # both against the float64 reference
    model = ROOT / "bundle/knee3d_icon/models/t1head_registration_model.pt"
    maps = resample_bench.inference_case(model)
    assert set(maps) == {"standard", "channels-last"}
    # the layouts round differently; the compositions' planar sampling (rows of 64 x 32) reads positions to 2^-13
    # voxels, so their maps agree to a few 1e-6 of the unit cube
    torch.testing.assert_close(maps["channels-last"](), maps["standard"](), atol=5e-6, rtol=0)


def test_loop_bench_parses_variants_with_and_without_a_source():
    import loop_bench

    assert loop_bench.parse_variant('base={}') == ("base", None, {})
    parsed = loop_bench.parse_variant('q@/tmp/wt={"ic_point_fraction": 0.25}')
    assert parsed == ("q", "/tmp/wt", {"ic_point_fraction": 0.25})
    for bad in ("base", "base=[1]", "base={"):
        with pytest.raises(ValueError):
            loop_bench.parse_variant(bad)
    assert loop_bench.DEMO["similarity_scales"] == [1, 2, 4] and loop_bench.DEMO["image_size"] == [128, 64, 128]


def test_lncc_bench_compares_the_compiled_lncc_with_the_eager_one():
    import lncc_bench

    from monai_icon.compilation import compiler_available
    from monai_icon.losses.compiled_lncc import COMPILED_LNCC_MIN_VOXELS

    small = lncc_bench.run([2, 1, 6, 7, 8], kernel=3, repeats=1)  # below the threshold: the same eager path twice
    assert small["compiled_taken"] is False and small["value_error"] == 0 and small["grad_error"] == 0
    if compiler_available():
        large = lncc_bench.run([1, 1, COMPILED_LNCC_MIN_VOXELS // 4096, 64, 64], kernel=5, repeats=1)
        assert large["compiled_taken"] is True and large["eager_ms"] > 0 and large["compiled_ms"] > 0
        assert large["value_error"] < 1e-4 and large["grad_error"] < 1e-4


def test_percentile_bench_prints_each_variant_with_its_difference(capsys):
    import percentile_bench

    percentile_bench.main(["--rounds", "1", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 80x96x80")]
    names = ["torch.quantile", "kthvalue (backend off)", "selection (backend default)"]
    assert [line.split(" | ")[1] for line in lines] == names
    assert all(float(line.split(" | ")[-1].rstrip(" |")) < 1e-5 for line in lines)


def test_unet_head_bench_times_both_settings_and_compares_their_outputs():
    import unet_head_bench

    rows = unet_head_bench.unet_rows(rounds=2, repeats=1, size=(16, 16, 16), batches=(2,))
    assert [row["case"] for row in rows] == ["U-Net 16x16x16, batch 2"]
    row = rows[0]
    assert row["layers_ms"] > 0 and row["fused_ms"] > 0 and row["ratio"] == row["fused_ms"] / row["layers_ms"]
    assert row["max_value"] > 0 and row["max_difference"] <= 1e-5 * row["max_value"]
