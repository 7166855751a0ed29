"""Published ICON-family models built from this project's blocks: names, shapes, strict loading, agreement."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_bundle
from monai_icon.apps import load_registration_model
from monai_icon.networks import pretrained
from monai_icon.networks.nets import TallUNet

HAS_REFERENCE = importlib.util.find_spec("icon_registration") is not None
KINDS = sorted(pretrained.PRETRAINED)


@pytest.mark.parametrize("kind", KINDS)
def test_names_and_shapes_match_the_reference_list(kind):
    state = pretrained.to_reference_state_dict(pretrained.build(kind))
    expected = pretrained.reference_shapes(kind)
    assert len(expected) > 150
    assert set(state) == set(expected)
    assert all(list(v.shape) == expected[k] for k, v in state.items())


def test_random_weights_round_trip_through_a_file(tmp_path):
    torch.manual_seed(0)
    network = pretrained.build("gradicon_oai")
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.save(pretrained.to_reference_state_dict(network), tmp_path / "w.trch")
    loaded = pretrained.load(tmp_path / "w.trch", "gradicon_oai")
    assert not loaded.training
    for k, v in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # without the loss wrapper's "regis_net." prefix the file loads too
    stripped = {k.removeprefix("regis_net."): v for k, v in pretrained.to_reference_state_dict(network).items()}
    torch.save(stripped, tmp_path / "bare.trch")
    pretrained.load(tmp_path / "bare.trch", "unigradicon")  # same layout as GradICON


def test_loading_is_strict_and_names_the_problem(tmp_path):
    state = pretrained.to_reference_state_dict(pretrained.build("gradicon_oai"))
    key = next(iter(state))
    cases = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "regis_net.extra": torch.zeros(1)},
        "mis-shaped": {**state, key: torch.zeros(3)},
    }
    for word, broken in cases.items():
        torch.save(broken, tmp_path / f"{word}.trch")
        with pytest.raises(ValueError, match=word):
            pretrained.load(tmp_path / f"{word}.trch", "gradicon_oai")
    with pytest.raises(ValueError, match="not a 'icon_oai' model"):
        torch.save(state, tmp_path / "g.trch")
        pretrained.load(tmp_path / "g.trch", "icon_oai")
    with pytest.raises(ValueError, match="unknown pretrained model kind"):
        pretrained.load(tmp_path / "g.trch", "voxelmorph")
    with pytest.raises(FileNotFoundError, match="bring|download"):
        pretrained.load(tmp_path / "none.trch", "unigradicon")
    (tmp_path / "junk.trch").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        pretrained.load(tmp_path / "junk.trch", "unigradicon")


def test_published_models_start_at_the_identity_and_register_through_the_app(tmp_path):
    torch.save(pretrained.to_reference_state_dict(pretrained.build("unigradicon")), tmp_path / "w.trch")
    model = load_registration_model(tmp_path / "w.trch", kind="unigradicon", window=(-1000.0, 1000.0), percentiles=None)
    assert model.spatial_size == (175, 175, 175) and model.reverse_axes and model.resize_mode == "trilinear"
    assert model.window == (-1000.0, 1000.0) and model.regularizer == "gradicon" and model.lmbda == 1.5
    with pytest.raises(ValueError, match="unknown model settings"):
        load_registration_model(tmp_path / "w.trch", kind="unigradicon", colour="red")


def test_chunky_middle_needs_its_input_size():
    net = TallUNet(3, chunky_middle=True)
    with pytest.raises(ValueError, match="40 x 96 x 96"):
        net(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="chunky_middle"):
        TallUNet(2, chunky_middle=True)


@pytest.mark.skipif(not HAS_REFERENCE, reason="the reference package icon_registration is not installed")
def test_tall_unet_agrees_with_the_reference_network():
    import icon_registration.networks as reference

    torch.manual_seed(0)
    for dims, shape in ((2, (37, 50)), (3, (20, 24, 18))):
        ref = reference.tallUNet2(dimension=dims)
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.05)
        ours = TallUNet(dims)
        ours.load_state_dict(ref.state_dict(), strict=True)
        a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
        for mode in ("train", "eval"):
            getattr(ref, mode)()
            getattr(ours, mode)()
            with torch.no_grad():
                torch.testing.assert_close(ours(a, b), ref(a, b))


@pytest.mark.skipif(not HAS_REFERENCE or importlib.util.find_spec("unigradicon") is None,
                    reason="the reference packages icon_registration / unigradicon are not installed")
def test_unigradicon_maps_agree_with_the_reference_for_the_same_weights(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    import unigradicon

    torch.manual_seed(0)
    shape = (128, 136, 128)  # the smallest sizes whose quarter resolution survives five U-Net levels
    ref = unigradicon.make_network([1, 1, *shape], include_last_step=True)
    for name, p in ref.named_parameters():
        torch.nn.init.normal_(p, std=0.02 if "lastConv" in name else 0.05)
    ref.eval()
    ours = pretrained.from_reference_state_dict(pretrained.build("unigradicon"), ref.state_dict(), "unigradicon").eval()
    a, b = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        expected = ref.regis_net(a, b)(ref.identity_map)
        got = ours.register(a, b).grid(shape)
    assert float((got - ref.identity_map).abs().max()) > 1e-2  # a non-trivial map
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _random_unigradicon_weights(path):
    """A uniGradICON weights file in the reference's layout: seeded random last layers (a non-identity map)."""
    torch.manual_seed(0)
    network = pretrained.build("unigradicon")
    for name, p in network.named_parameters():
        if "lastConv" in name:
            torch.nn.init.normal_(p, std=0.01)
    torch.save(pretrained.to_reference_state_dict(network), path)
    return path


def test_register_pairs_config_with_a_weights_file(tmp_path):
    """configs/pretrained/register_pairs.yaml, run as a user runs it, on a small CT-like pair."""
    import json

    import nibabel as nib

    _random_unigradicon_weights(tmp_path / "w.trch")
    affine = torch.diag(torch.tensor([2.0, 2.5, 3.0, 1.0])).numpy()
    for name in ("a", "b"):
        volume = (torch.rand(40, 36, 20) * 2000 - 1000).numpy()
        nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "pairs.json").write_text(
        json.dumps([{"moving_image": "a.nii.gz", "fixed_image": "b.nii.gz", "pair_id": "ab"}])
    )
    run_bundle(
        "run",
        "--config_file",
        str(ROOT / "configs" / "pretrained" / "register_pairs.yaml"),
        "--weights",
        str(tmp_path / "w.trch"),
        "--kind",
        "unigradicon",
        "--datalist",
        str(tmp_path / "pairs.json"),
        "--output_dir",
        str(tmp_path / "out"),
        "--window",
        "[-1000, 1000]",
        "--spatial_size",
        "[128, 128, 128]",
    )
    for suffix in ("_warped.nii.gz", "_ddf.nii.gz", "_phi.h5"):
        assert (tmp_path / "out" / f"ab{suffix}").is_file()
    warped = nib.load(tmp_path / "out" / "ab_warped.nii.gz")
    assert warped.shape == (40, 36, 20)
    ddf = nib.load(tmp_path / "out" / "ab_ddf.nii.gz").get_fdata()
    assert np.abs(ddf).max() > 0.1  # the (random) network moved the image: a real run, not the identity


def test_finetune_config_trains_published_weights_and_exports_a_model_register_uses(tmp_path):
    """configs/pretrained/finetune.yaml, run as a user runs it, at the smallest grid the published networks accept
    (one Adam step on reference-layout random weights): the exported model file rebuilds the published
    architecture from data (no code), carries the changed weights and the preprocessing, and `monai-icon register`
    uses it; the training preprocessing is register's (ToNetworkGridd equals to_network_grid)."""
    import json

    import nibabel as nib

    from monai_icon.apps import to_network_grid
    from monai_icon.apps.cli import main
    from monai_icon.apps.finetune import ToNetworkGridd, pretrained_settings
    from monai_icon.apps.physical import load_image

    _random_unigradicon_weights(tmp_path / "w.trch")
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    yy, xx, zz = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 20)], indexing="ij")
    for i in range(3):
        r = np.sqrt((yy - 0.1 * i) ** 2 + xx ** 2 + zz ** 2)
        nib.save(nib.Nifti1Image((1000.0 / (1.0 + np.exp(20 * (r - 0.6)))).astype(np.float32), affine),
                 str(tmp_path / f"v{i}.nii.gz"))
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": f"v{i}.nii.gz"} for i in range(3)]}))
    settings = pretrained_settings("unigradicon", [128, 128, 128])
    image = load_image(tmp_path / "v0.nii.gz")
    via_transform = ToNetworkGridd("image", settings)({"image": image})["image"]
    direct = to_network_grid(image, settings["spatial_size"], settings["axcodes"], settings["percentiles"], None,
                             None, settings.get("window"), settings["resize_mode"], settings["reverse_axes"],
                             settings.get("normalise_first", False))
    assert torch.equal(via_transform.as_tensor(), direct.as_tensor())
    assert torch.equal(via_transform.affine, direct.affine)
    with pytest.raises(TypeError, match="MetaTensor"):
        ToNetworkGridd("image", settings)({"image": np.zeros((1, 4, 4, 4))})
    with pytest.raises(ValueError, match="unknown pretrained model kind"):
        pretrained_settings("nope")

    out = tmp_path / "finetune"
    run_bundle("run", "--config_file", str(ROOT / "configs" / "pretrained" / "finetune.yaml"),
               "--weights", str(tmp_path / "w.trch"), "--kind", "unigradicon",
               "--datalist", str(tmp_path / "datalist.json"), "--output_dir", str(out),
               "--spatial_size", "[128, 128, 128]", "--iterations_per_epoch", "1", "--epochs", "1")
    model = load_registration_model(out / "registration_model.pt")
    assert model.spatial_size == (128, 128, 128) and model.reverse_axes and model.similarity == "lncc"
    tuned = model.network.state_dict()
    original = pretrained.load(tmp_path / "w.trch", "unigradicon").state_dict()
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned if tuned[k].is_floating_point())
    assert main(["register", "--fixed", str(tmp_path / "v0.nii.gz"), "--moving", str(tmp_path / "v1.nii.gz"),
                 "--model", str(out / "registration_model.pt"), "--warped", str(tmp_path / "w.nii.gz")]) == 0
    assert nib.load(tmp_path / "w.nii.gz").shape == (40, 36, 20)
