"""The multi-step 3D model, per-label Dice, and the 3D knee configs run as a user runs them."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_bundle
from monai_icon.apps import load_registration_model
from monai_icon.data import build_knee_datalist, write_datalist, write_synthetic_knees
from monai_icon.engines import RegKeys
from monai_icon.handlers import LabelDice
from monai_icon.networks import Frozen, load_weights, multistep_registration, unet_step
from monai_icon.networks.maps import one_hot_labels

CONFIGS = ROOT / "bundle" / "knee3d_icon" / "configs"
TINY = {"encoder_channels": [4, 8], "decoder_channels": [8, 4]}


def test_frozen_block_stays_fixed_in_eval_mode_and_passes_gradients_to_later_steps():
    coarse = unet_step(3, **TINY)
    torch.nn.init.normal_(coarse.net.out.weight, std=0.05)
    frozen = Frozen(coarse)
    frozen.train()
    assert not coarse.training and all(not p.requires_grad for p in coarse.parameters())
    net = multistep_registration(coarse_steps=1, fine_steps=1, **TINY)
    net.train()
    assert not net.block.first.block.training and net.block.second.training
    moving, fixed = torch.rand(2, 1, 8, 8, 4), torch.rand(2, 1, 8, 8, 4)
    phi_AB, _ = net(moving, fixed)
    torch.nn.init.normal_(net.block.second.net.out.weight, std=0.05)
    phi_AB, phi_BA = net(moving, fixed)
    (phi_AB.grid((8, 8, 4)) ** 2).sum().backward()
    assert net.block.second.net.out.weight.grad is not None
    assert all(p.grad is None for p in net.block.first.parameters())
    # the frozen map still responds to the points it is evaluated at (composition is differentiable)
    points = torch.rand(1, 3, 5, requires_grad=True)
    frozen(moving, fixed)(points).sum().backward()
    assert points.grad is not None


def test_stage_two_loads_stage_one_strictly(tmp_path):
    stage1 = multistep_registration(coarse_factor=1, **TINY)
    for p in stage1.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.save(stage1.state_dict(), tmp_path / "s1.pt")
    stage2 = multistep_registration(fine_steps=2, coarse_weights=tmp_path / "s1.pt", **TINY)
    coarse = stage2.block.first.first.block  # chain(Frozen(coarse), step, step)
    for k, v in stage1.block.state_dict().items():
        assert torch.equal(coarse.state_dict()[k], v)
    # the same keys whether the coarse part is frozen or not: the final model loads for evaluation
    torch.save(stage2.state_dict(), tmp_path / "s2.pt")
    load_weights(multistep_registration(fine_steps=2, freeze_coarse=False, **TINY), tmp_path / "s2.pt")
    with pytest.raises(ValueError, match="does not match the network"):
        multistep_registration(coarse_steps=1, coarse_weights=tmp_path / "s1.pt", **TINY)
    with pytest.raises(FileNotFoundError):
        multistep_registration(coarse_weights=tmp_path / "none.pt", **TINY)


def test_label_dice_per_label_and_mean():
    fixed = torch.zeros(1, 1, 4, 4, 2, dtype=torch.long)
    fixed[..., :2, :, :] = 1
    fixed[..., 3, :, :] = 2
    pred = fixed.clone()
    pred[..., 0, :, :] = 0  # label 1: 8 of 16 voxels found -> Dice 2*8/(8+16)
    output = [{RegKeys.PRED_LABEL: one_hot_labels(pred, 3)[0], RegKeys.FIXED_LABEL: one_hot_labels(fixed, 3)[0]}]
    expected = {1: 2 * 8 / 24, 2: 1.0, None: (2 * 8 / 24 + 1.0) / 2}
    for label, value in expected.items():
        handler = LabelDice(label, save_details=False)
        handler.reset()
        handler.update(handler._output_transform(output))
        assert handler.compute() == pytest.approx(value)


def bundle_run(configs, *args, timeout=900):
    proc = run_bundle("run", "--config_file", str([str(CONFIGS / c) for c in configs]), *args, timeout=timeout)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def knee_runs(tmp_path_factory):
    """Stage 1, stage 2 (frozen stage 1 + a full-resolution step) and evaluation on synthetic knees (LNCC)."""
    root = tmp_path_factory.mktemp("knee3d")
    write_synthetic_knees(root / "knees", num_subjects=6, shape=(32, 32, 16), spacing=(4.2, 4.2, 7.5))
    write_datalist(build_knee_datalist(root / "knees", 0.3, num_test_pairs=2, relative_to=root), root / "datalist.json")
    options = {
        "--datalist": str(root / "datalist.json"),
        "--output_root": str(root / "runs"),
        "--full_size": "[16,16,8]",
        "--iterations_per_epoch": "2",
        "--batch_size": "2",
        "--val_pairs": "2",
        "--epochs": "1",
        "--architecture#encoder_channels": "[4,8]",
        "--architecture#decoder_channels": "[8,4]",
        "--fold_threshold": "-1",
        "--similarity": "lncc",  # MSE is the default; the option is exercised here
        "--augment_flip": "0.5",  # mirrored training pairs (off by default), exercised here
    }
    common = [item for pair in options.items() for item in pair]
    logs = {"stage1": bundle_run(["common.yaml", "stage1.yaml"], *common)}
    logs["stage2"] = bundle_run(["common.yaml", "stage2.yaml"], *common)
    logs["evaluate"] = bundle_run(["common.yaml", "stage2.yaml", "evaluate.yaml"], *common)
    return root, logs


def test_stages_train_export_and_chain(knee_runs):
    root, logs = knee_runs
    for stage in ("stage1", "stage2"):
        models = root / "runs" / stage / "models"
        assert {"model.pt", "registration_model.pt"} <= {p.name for p in models.iterdir()}
        assert "Dice, femoral cartilage" in logs[stage] and "folds per image" in logs[stage]
    s1 = load_registration_model(root / "runs" / "stage1" / "models" / "registration_model.pt")
    s2 = load_registration_model(root / "runs" / "stage2" / "models" / "registration_model.pt")
    assert s1.spatial_size == (8, 8, 4) and s2.spatial_size == (16, 16, 8) and s2.axcodes == "PIR"
    assert s2.similarity == "lncc" and s2.target_side == "LEFT"
    # fold_threshold -1: lambda rises by the increment every iteration (stage 1: +0.1 x 2; stage 2 starts there)
    assert s1.lmbda == pytest.approx(1.2) and s2.lmbda == pytest.approx(1.2 + 2 * 0.8)
    # stage 2 kept stage 1's (frozen) weights
    coarse = s2.network.block.first.block
    for k, v in s1.network.block.state_dict().items():
        assert torch.equal(coarse.state_dict()[k], v)


def test_evaluation_writes_per_pair_csv_and_summary(knee_runs):
    root, logs = knee_runs
    out = root / "runs" / "stage2" / "eval"
    for name in (
        "val_dice_femoral_cartilage",
        "val_dice_tibial_cartilage",
        "val_folds",
        "val_folds_percent",
        "val_time",
    ):
        rows = list(csv.reader(open(out / f"{name}_raw.csv"), delimiter="\t"))
        assert len(rows) == 1 + 2, name  # header + one row per test pair
    summary = (out / "metrics.csv").read_text()
    assert "val_label_dice" in summary and "val_label_dice_unregistered" in summary
    assert "evaluation on 2 test pairs" in logs["evaluate"]
    assert list(out.glob("test_*.png"))


def test_evaluation_with_the_test_time_ensemble(knee_runs, tmp_path):
    """evaluate.yaml's test-time ensemble options wrap the trained network (weights loaded into it) in
    ``ensemble_network``: the evaluation runs and reports the same metrics, with Dice different from the plain
    network's; a bad option is refused."""
    root, logs = knee_runs
    options = ["--datalist", str(root / "datalist.json"), "--output_root", str(root / "runs"), "--full_size",
               "[16,16,8]", "--architecture#encoder_channels", "[4,8]", "--architecture#decoder_channels", "[8,4]",
               "--similarity", "lncc"]
    plain = (root / "runs" / "stage2" / "eval" / "metrics.csv").read_text()
    log = bundle_run(["common.yaml", "stage2.yaml", "evaluate.yaml"], *options, "--test_time_symmetric", "true",
                     "--test_time_flip_axes", "[0]", "--test_time_passes", "2")
    assert "evaluation on 2 test pairs" in log
    ensemble = (root / "runs" / "stage2" / "eval" / "metrics.csv").read_text()

    def dice(text):
        return float(next(line.split(",")[1] for line in text.splitlines() if line.startswith("val_label_dice,")))

    assert dice(ensemble) != dice(plain)
    with pytest.raises(AssertionError, match=r"flip_axes \(7,\) must be spatial axes of 3D images"):
        bundle_run(["common.yaml", "stage2.yaml", "evaluate.yaml"], *options, "--test_time_flip_axes", "[7]")


def test_exported_model_registers_files_with_the_cli(knee_runs, tmp_path):
    from monai_icon.apps.cli import main

    root, _ = knee_runs
    images = sorted((root / "knees").glob("*_image.nii.gz"))
    args = ["register", "--fixed", str(images[0]), "--moving", str(images[1]), "--model",
            str(root / "runs" / "stage2" / "models" / "registration_model.pt"), "--warped", str(tmp_path / "w.nii.gz"),
            "--fixed-side", "LEFT", "--moving-side", "RIGHT"]
    assert main(args) == 0
    import nibabel as nib

    assert nib.load(tmp_path / "w.nii.gz").shape == (32, 32, 16)
    assert np.isfinite(nib.load(tmp_path / "w.nii.gz").get_fdata()).all()


def test_augmentation_is_off_by_default_and_moves_labels_and_masks_with_their_images():
    from monai.bundle import ConfigParser

    from monai_icon.transforms import RandBatchAugmentd

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    assert parser.get_parsed_content("augment") is None
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    parser.update({"augment_deform": 1.5, "augment_gamma": 1.25})
    augment = parser.get_parsed_content("augment")
    assert isinstance(augment, RandBatchAugmentd) and augment.deform == 1.5 and augment.gamma == 1.25
    assert augment.follow == {"moving_label": "moving_image", "fixed_label": "fixed_image",
                              "moving_mask": "moving_image", "fixed_mask": "fixed_image"}


def test_pair_flip_mirrors_both_images_of_a_pair_together():
    """``augment_flip``: off by default; on, MONAI's RandFlipd mirrors the moving and fixed images (and labels) of a
    pair along the chosen axis together, in about that share of the pairs, never one image alone."""
    from monai.bundle import ConfigParser
    from monai.transforms import RandFlipd

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    assert parser.get_parsed_content("pair_flip") is None
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    parser.update({"augment_flip": 0.5, "augment_flip_axes": [1]})
    flip = parser.get_parsed_content("pair_flip")
    assert isinstance(flip, RandFlipd)
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    flipped_count = 0
    for _ in range(40):
        item = flip({"moving_image": image.clone(), "fixed_image": image + 100, "moving_label": image.clone(),
                     "pair_id": "x"})
        moving_flipped = torch.equal(item["moving_image"], image.flip(2))
        assert moving_flipped or torch.equal(item["moving_image"], image)
        assert torch.equal(item["fixed_image"], (image + 100).flip(2) if moving_flipped else image + 100)
        assert torch.equal(item["moving_label"], item["moving_image"])
        flipped_count += moving_flipped
    assert 8 <= flipped_count <= 32


def test_training_reads_mask_files_binarised_and_masks_loss_and_inputs(tmp_path):
    """``use_masks``: each training item's ``mask`` file follows its image like a label (nearest) and is binarised
    (any nonzero value is inside), the pairs carry ``moving_mask``/``fixed_mask``, and stage 1 trains with loss and
    input masking (``mask_inputs``) as a user runs it."""
    import nibabel as nib

    from monai_icon.data import RandomPairDataset
    from monai_icon.transforms import oai_train_transforms

    write_synthetic_knees(tmp_path / "knees", num_subjects=5, shape=(32, 32, 16), spacing=(4.2, 4.2, 7.5))
    datalist = build_knee_datalist(tmp_path / "knees", 0.4, num_test_pairs=1, relative_to=tmp_path)
    for item in datalist["training"]:
        label = nib.load(tmp_path / item["label"])
        mask = (np.asarray(label.dataobj) > 0).astype(np.uint8) * 255  # 0/255 like many mask files
        mask_file = Path(item["label"]).with_name(Path(item["label"]).name.replace("label", "mask"))
        nib.save(nib.Nifti1Image(mask, label.affine), str(tmp_path / mask_file))
        item["mask"] = str(mask_file)
    write_datalist(datalist, tmp_path / "datalist.json")
    item = {k: str(tmp_path / v) if k in ("image", "mask") else v for k, v in datalist["training"][0].items()}
    out = oai_train_transforms((16, 16, 8), with_mask=True)(item)
    assert tuple(out["mask"].shape) == (1, 16, 16, 8)
    assert set(torch.unique(torch.as_tensor(out["mask"])).tolist()) == {0.0, 1.0}
    pair = RandomPairDataset([out, out], 1, keys=("image", "mask"))[0]
    assert {"moving_mask", "fixed_mask"} <= set(pair)
    log = bundle_run(["common.yaml", "stage1.yaml"], "--datalist", str(tmp_path / "datalist.json"),
                     "--output_root", str(tmp_path / "runs"), "--full_size", "[16,16,8]",
                     "--iterations_per_epoch", "2", "--batch_size", "2", "--val_pairs", "1", "--epochs", "1",
                     "--architecture#encoder_channels", "[4,8]", "--architecture#decoder_channels", "[8,4]",
                     "--use_masks", "true", "--mask_inputs", "true",
                     "--augment_deform", "0.3", "--augment_gamma", "1.2")
    assert (tmp_path / "runs" / "stage1" / "models" / "registration_model.pt").is_file(), log
    assert "augment_deform: 0.3" in log  # the masks moved with their augmented images (else the trainer refuses)
    # the option really reads the items' mask files: without them in the datalist the run stops, naming the key
    for entry in datalist["training"]:
        entry.pop("mask")
    write_datalist(datalist, tmp_path / "no_masks.json")
    proc = run_bundle("run", "--config_file", str([str(CONFIGS / c) for c in ("common.yaml", "stage1.yaml")]),
                      "--datalist", str(tmp_path / "no_masks.json"), "--output_root", str(tmp_path / "runs2"),
                      "--full_size", "[16,16,8]", "--iterations_per_epoch", "1", "--batch_size", "2",
                      "--val_pairs", "1", "--epochs", "1", "--architecture#encoder_channels", "[4,8]",
                      "--architecture#decoder_channels", "[8,4]", "--use_masks", "true", check=False)
    assert proc.returncode != 0 and "mask" in proc.stdout + proc.stderr


def test_one_stage_on_finer_images_exports_its_resampled_coarse_steps(tmp_path):
    """The single-stage recipe (docs/train_3d.md): the coarse steps on 2x pooled inputs, the loss on the
    full-resolution images, the regulariser on the steps' own grid, the composed map resampled there, LNCC with
    its own window; the exported model runs the same network for `monai-icon register`."""
    from monai.bundle import ConfigParser

    from monai_icon.apps.cli import main
    from monai_icon.losses import MapSupervisionLoss, MultiScaleSimilarity
    from monai_icon.networks import Downsample
    from monai_icon.transforms import RandBatchAugmentd, RandSelfPaird

    write_synthetic_knees(tmp_path / "knees", num_subjects=4, shape=(32, 32, 16), spacing=(4.2, 4.2, 7.5))
    write_datalist(build_knee_datalist(tmp_path / "knees", 0.3, num_test_pairs=1, relative_to=tmp_path),
                   tmp_path / "datalist.json")
    options = {"--datalist": str(tmp_path / "datalist.json"), "--output_root": str(tmp_path / "runs"),
               "--full_size": "[16,16,8]", "--image_size": "[16,16,8]", "--coarse_factor": "2",
               "--regularizer_size": "[8,8,4]", "--architecture#resample_coarse": "true", "--similarity": "lncc",
               "--lncc_kernel": "3", "--regularizer": "gradicon", "--iterations_per_epoch": "2", "--batch_size": "2",
               "--val_pairs": "1", "--epochs": "1", "--architecture#encoder_channels": "[4,8]",
               "--architecture#decoder_channels": "[8,4]",
               # known-map pairs with map supervision and a two-scale similarity run through the bundle too
               "--self_pairs": "0.5", "--similarity_scales": "[1,2]", "--augment_deform": "1.0",
               # validation every 2 epochs: the single epoch is still validated once training ends
               "--val_interval": "2",
               "--ema_momentum": "0.5",  # a moving average of the weights, exported beside them
               "--ic_point_fraction": "0.5"}  # GradICON at a random half of its points (the demo: a quarter)
    log = bundle_run(["common.yaml", "stage1.yaml"], *[item for pair in options.items() for item in pair])
    assert log.count("ICONEvaluator - INFO - Epoch[1] Complete") == 1 and "label Dice (mean over labels)" in log
    exported = tmp_path / "runs" / "stage1" / "models" / "registration_model.pt"
    model = load_registration_model(exported)
    assert model.spatial_size == (16, 16, 8) and model.similarity == "lncc"
    # the moving average: its own model file, in the resume checkpoint too, with weights between the two last steps'
    averaged = load_registration_model(exported.with_name("registration_model_ema.pt"))
    assert averaged.spatial_size == model.spatial_size
    final, mean = model.network.state_dict(), averaged.network.state_dict()
    assert any(not torch.equal(final[k], mean[k]) for k in final if final[k].is_floating_point())
    resume = torch.load(next((tmp_path / "runs" / "stage1" / "models" / "checkpoints").glob("*.pt")),
                        weights_only=True)
    assert set(resume) >= {"network", "optimizer", "trainer", "ema_network"}
    for k in final:  # the checkpoint's average is the exported one
        torch.testing.assert_close(resume["ema_network"][k].float(), mean[k].float())
    block = model.network.block
    assert isinstance(block, Downsample) and block.factor == 2 and block.resample is True
    assert torch.load(exported, weights_only=True)["network_def"]["resample_coarse"] is True  # a bool, not "true"
    images = sorted((tmp_path / "knees").glob("*_image.nii.gz"))
    assert main(["register", "--fixed", str(images[0]), "--moving", str(images[1]), "--model", str(exported),
                 "--warped", str(tmp_path / "w.nii.gz"), "--fixed-side", "LEFT", "--moving-side", "RIGHT"]) == 0
    # the options reach the objects the bundle builds
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    parser.update({"regularizer_size": [8, 8, 4], "similarity": "lncc", "lncc_kernel": 5, "regularizer": "gradicon",
                   "ic_point_fraction": 0.25})
    loss = parser.get_parsed_content("loss")
    assert loss.regularizer_size == (8, 8, 4) and loss.similarity.kernel_size == 5
    assert loss.regularizer.point_fraction == 0.25
    assert parser.get_parsed_content("cpu_backend") == "auto"  # the CPU optimisations by default (faster 3D steps)
    assert parser["train"]["trainer"]["backend"] == "@cpu_backend"
    assert parser.get_parsed_content("network_def").block.pool == "average"  # the default coarse inputs
    assert parser.get_parsed_content("map_supervision") is None  # the paper's loss alone by default
    tuning = [s for s in parser["initialize"] if isinstance(s, dict) and s.get("backend") == "@cpu_backend"]
    assert tuning[0]["_target_"] == "monai_icon.backend.tune_allocator_for"  # glibc keeps freed blocks for reuse
    handler = next(i for i, h in enumerate(parser["train"]["handler_list"]) if isinstance(h, dict)
                   and h.get("_target_", "").endswith("ValidationHandler"))
    parser.update({"val_interval": "3"})
    assert parser.get_parsed_content(f"train#handler_list#{handler}#interval") == 3
    parser.update({"val_interval": 0})
    with pytest.raises(RuntimeError) as err:  # MONAI's config parser wraps the ValueError
        parser.get_parsed_content(f"train#handler_list#{handler}#interval")
    assert "val_interval must be an integer >= 1" in str(err.value.__cause__)
    parser.update({"val_interval": 1})
    parser.update({"self_pairs": 0.5, "augment_deform": 1.0, "similarity_scales": [1, 2, 4]})
    augment = parser.get_parsed_content("augment")
    known = [t for t in augment.transforms if isinstance(t, RandSelfPaird)]
    assert len(augment.transforms) == 2 and isinstance(augment.transforms[0], RandBatchAugmentd)  # augment first
    assert known[0].prob == 0.5 and known[0].deform == 4.0
    assert isinstance(parser.get_parsed_content("map_supervision"), MapSupervisionLoss)
    similarity = parser.get_parsed_content("loss").similarity
    assert isinstance(similarity, MultiScaleSimilarity) and similarity.factors == (1, 2, 4)
    parser.update({"architecture#coarse_pool": "unshuffle", "architecture#encoder_channels": [4, 8],
                   "architecture#decoder_channels": [8, 4], "coarse_factor": 2})
    unshuffled = parser.get_parsed_content("network_def", instantiate=True)
    assert unshuffled.block.pool == "unshuffle" and unshuffled.block.block.first.net.in_channels == 16


def test_a_warm_up_stage_at_half_resolution_starts_the_full_resolution_stage(tmp_path):
    """The T1-head demo's two runs (scripts/run_knee3d_demo.sh, docs/train_3d.md): the network trained first
    with its loss on images at half resolution (the same U-Nets on the same grid, ``coarse_factor`` 1), then on the
    full-resolution images starting from those weights (``init_weights``)."""
    from monai.bundle import ConfigParser

    write_synthetic_knees(tmp_path / "knees", num_subjects=4, shape=(32, 32, 16), spacing=(4.2, 4.2, 7.5))
    write_datalist(build_knee_datalist(tmp_path / "knees", 0.3, num_test_pairs=1, relative_to=tmp_path),
                   tmp_path / "datalist.json")
    shared = {"--datalist": str(tmp_path / "datalist.json"), "--output_root": str(tmp_path / "runs"),
              "--full_size": "[16,16,8]", "--regularizer_size": "[8,8,4]", "--architecture#resample_coarse": "true",
              "--similarity": "lncc", "--lncc_kernel": "3", "--regularizer": "gradicon", "--batch_size": "2",
              "--iterations_per_epoch": "2", "--val_pairs": "1", "--epochs": "1",
              "--architecture#encoder_channels": "[4,8]", "--architecture#decoder_channels": "[8,4]"}
    warm = {"--stage": "warm", "--image_size": "[8,8,4]", "--coarse_factor": "1", "--similarity_scales": "[1,2]",
            "--lr_schedule": "constant", "--warmup_steps": "1", "--lmbda_schedule": "continuation",
            "--lmbda_target": "4"}
    log = bundle_run(["common.yaml", "stage1.yaml"], *[x for pair in {**shared, **warm}.items() for x in pair])
    assert "ICON 3D warm: last validation" in log
    warm_file = tmp_path / "runs" / "warm" / "models" / "model.pt"
    warm_weights = torch.load(warm_file, weights_only=True)
    assert any(v.abs().sum() > 0 for k, v in warm_weights.items() if k.endswith("out.weight"))  # it trained
    # the full-resolution stage, at learning rate 0: it must end with the warm-up stage's weights
    main_stage = {"--image_size": "[16,16,8]", "--coarse_factor": "2", "--similarity_scales": "[1,2]",
                  "--lmbda_schedule": "fixed", "--lmbda": "4", "--learning_rate": "0", "--init_weights": str(warm_file)}
    log = bundle_run(["common.yaml", "stage1.yaml"], *[x for pair in {**shared, **main_stage}.items() for x in pair])
    assert "ICON 3D stage1: last validation" in log
    final = load_registration_model(tmp_path / "runs" / "stage1" / "models" / "registration_model.pt").network
    assert final.block.factor == 2  # the same U-Nets, now on 2x pooled full-resolution images
    parameters = dict(final.named_parameters())
    assert set(parameters) <= set(warm_weights)
    for name, value in parameters.items():
        assert torch.equal(value.float(), warm_weights[name].float()), name
    # a missing file is named before anything runs; no init_weights (the default) trains from scratch
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "stage1.yaml")])
    parser.update({"architecture#encoder_channels": [4, 8], "architecture#decoder_channels": [8, 4]})
    assert parser["init_weights"] is None
    fresh = parser.get_parsed_content("network_def", instantiate=True)
    assert all(float(v.abs().sum()) == 0 for k, v in fresh.state_dict().items() if k.endswith("out.weight"))
    parser.update({"init_weights": str(tmp_path / "missing.pt")})
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("network_def", instantiate=True)
    assert "missing.pt" in str(err.value.__cause__) and "init_weights" in str(err.value.__cause__)


def test_shipped_t1head_model_registers_held_out_demo_pairs(tmp_path):
    """The 3D model shipped with the bundle (float16 weights; `DATA=real bash scripts/run_knee3d_demo.sh` trains it)
    loads as data and, network alone, raises the label Dice of two of the demo's test pairs (subjects it never
    saw) well above the unregistered Dice, without folds, on each fixed file's own grid."""
    from monai_icon.apps.register import register_pairs
    from monai_icon.data import load_pair_datalist, write_deformed_copies
    from monai_icon.networks import Downsample, ensemble_network

    model_file = ROOT / "bundle" / "knee3d_icon" / "models" / "t1head_registration_model.pt"
    model = load_registration_model(model_file)
    assert model.spatial_size == (128, 64, 128) and isinstance(model.network.block, Downsample)  # RAS: 128x62x128
    assert model.network.block.resample is True
    # the demo's data and split (scripts/run_knee3d_demo.sh, DATA=real)
    write_deformed_copies(tmp_path / "volumes", num_copies=16, deformation_mm=6.0, seed=0)
    write_datalist(build_knee_datalist(tmp_path / "volumes", 0.25, 8, require_side=False, relative_to=tmp_path,
                                       val_fraction=0.2, num_val_pairs=6), tmp_path / "datalist.json")
    pairs = load_pair_datalist(tmp_path / "datalist.json", key="test_pairs")[:2]
    summaries = register_pairs(pairs, model, tmp_path / "out")
    for summary in summaries:
        assert summary["mean_dice"] > summary["mean_dice_unregistered"] + 0.07, summary
        assert summary["folds_percent"] < 0.1
    # the test-time ensemble (phi_AB with the inverse of phi_BA, and both on left-right mirrored images), applied
    # twice: better on each pair (docs/results.md), still without folds
    model.network = ensemble_network(model.network, symmetric=True, flip_axes=[0], passes=2)
    for plain, summary in zip(summaries, register_pairs(pairs, model, tmp_path / "ensemble")):
        assert summary["mean_dice"] > plain["mean_dice"] + 0.005, (plain, summary)
        assert summary["folds_percent"] < 0.1


SHIPPED_T1HEAD = ROOT / "bundle" / "knee3d_icon" / "models" / "t1head_registration_model.pt"


def test_bundle_folder_is_the_shipped_model_for_monai_icon_register():
    """``monai-icon register --model bundle/knee3d_icon`` loads, through configs/inference.json, the same network,
    weights and preprocessing as the shipped model file."""
    from dataclasses import fields

    from_bundle = load_registration_model(ROOT / "bundle" / "knee3d_icon")
    from_file = load_registration_model(SHIPPED_T1HEAD)
    for field in fields(from_file):
        if field.name != "network":
            assert getattr(from_bundle, field.name) == getattr(from_file, field.name), field.name
    bundle_state, file_state = from_bundle.network.state_dict(), from_file.network.state_dict()
    assert bundle_state.keys() == file_state.keys()
    assert all(torch.equal(bundle_state[k], file_state[k]) for k in file_state)


def test_bundle_verifies_and_its_inference_config_registers_a_pair(tmp_path):
    """The 3D bundle passes MONAI's metadata and network checks, and ``python -m monai.bundle run --config_file
    configs/inference.json`` registers a pair of files with the shipped model: a warped image and a voxel DDF on
    the network grid, the warped image closer to the fixed one than the moving image was."""
    import json

    import nibabel as nib
    from monai.bundle import ConfigParser

    from monai_icon.data import write_deformed_copies

    meta = str(CONFIGS / "metadata.json")
    run_bundle("verify_metadata", "--meta_file", meta, "--filepath", str(CONFIGS / "metadata_schema.json"))
    inference = str(CONFIGS / "inference.json")
    run_bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", inference)

    moving, fixed = (r["image"] for r in write_deformed_copies(tmp_path / "volumes", num_copies=2, seed=1))
    pair = {"moving_image": moving, "fixed_image": fixed}
    (tmp_path / "pairs.json").write_text(json.dumps([pair]))
    log = bundle_run(["inference.json"], "--bundle_root", str(CONFIGS.parent), "--datalist_file",
                     str(tmp_path / "pairs.json"), "--output_dir", str(tmp_path / "out"))
    assert "registered 1 pairs" in log
    (warped_file,), (ddf_file,) = (sorted((tmp_path / "out").glob(f"*_{kind}.nii.gz")) for kind in ("warped", "ddf"))
    warped = np.asarray(nib.load(warped_file).dataobj, dtype=np.float32)
    ddf = np.asarray(nib.load(ddf_file).dataobj)
    assert warped.shape[:3] == (128, 64, 128) and ddf.size == 3 * 128 * 64 * 128
    assert np.isfinite(ddf).all() and np.abs(ddf).max() > 0.5  # voxels
    parser = ConfigParser()
    parser.read_config(inference)
    images = parser.get_parsed_content("preprocessing")(pair)
    moving_grid, fixed_grid = (images[k][0].numpy() for k in ("moving_image", "fixed_image"))
    error = np.mean((warped.reshape(fixed_grid.shape) - fixed_grid) ** 2)
    assert error < 0.5 * np.mean((moving_grid - fixed_grid) ** 2)


def test_shipped_brain_transfer_model_is_the_t1head_network_in_float16_and_registers(tmp_path):
    """``models/brain_transfer_model.pt`` (scripts/train_transfer3d.sh) is stored as float16 data, has the T1-head
    model's network spec and preprocessing, and, network alone, raises the label Dice of a held-out demo pair
    without folds."""
    from dataclasses import fields

    from monai_icon.apps.register import register_pairs
    from monai_icon.data import load_pair_datalist, write_deformed_copies

    path = ROOT / "bundle" / "knee3d_icon" / "models" / "brain_transfer_model.pt"
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in content["state_dict"].values() if v.is_floating_point())
    transfer, t1head = load_registration_model(path), load_registration_model(SHIPPED_T1HEAD)
    for field in fields(transfer):
        if field.name != "network":
            assert getattr(transfer, field.name) == getattr(t1head, field.name), field.name
    assert transfer.network.state_dict().keys() == t1head.network.state_dict().keys()
    write_deformed_copies(tmp_path / "volumes", num_copies=16, deformation_mm=6.0, seed=0)
    write_datalist(build_knee_datalist(tmp_path / "volumes", 0.25, 8, require_side=False, relative_to=tmp_path,
                                       val_fraction=0.2, num_val_pairs=6), tmp_path / "datalist.json")
    pair = load_pair_datalist(tmp_path / "datalist.json", key="test_pairs")[:1]
    (summary,) = register_pairs(pair, transfer, tmp_path / "out")
    assert summary["mean_dice"] > summary["mean_dice_unregistered"] + 0.07, summary
    assert summary["folds_percent"] < 0.1
