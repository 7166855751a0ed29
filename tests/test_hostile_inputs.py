"""Fault injection: hostile and broken inputs against the command line, one table row per case.

Every case asserts the exit status, a single line on stderr without a traceback, and the file-system invariants:
every input byte-for-byte unchanged, nothing new in the work folder (no output, no partial file). The classes:
model files that try to reach the network or the file system, failed writes (a file-size limit in a subprocess),
outputs that are inputs (by path, symbolic link and hard link), non-finite values and broken geometry, hostile
pair datalists, and numeric flags beyond what the inputs or the memory allow.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_icon.apps import save_registration_model
from monai_icon.apps.cli import main
from monai_icon.apps.register import MODEL_FORMAT
from monai_icon.networks import multistep_registration

from conftest import ROOT

TINY = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
TINY_DEF = {"_target_": "monai_icon.networks.multistep_registration", **TINY}
SHAPE = (16, 16, 8)


class _Requests(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_GET(self):  # noqa: N802 - the http.server API
        self.received.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"secret")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """A local HTTP server that must never be asked for anything."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Requests)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def _broken_header(path, array, **fields):
    """An uncompressed NIfTI whose stored header fields are then overwritten as given (nibabel would repair them
    on save)."""
    _nifti(path, array)
    with open(path, "rb") as stream:
        header = nib.Nifti1Header.from_fileobj(stream, check=False)
    for key, value in fields.items():
        if key.startswith("srow"):
            row, column = key.split(":")
            header[row][int(column)] = value
        else:
            header[key] = value
    with open(path, "r+b") as stream:
        stream.write(header.binaryblock)
    return path


def _model_file(path, network_def=TINY_DEF, state=None):
    state = multistep_registration(**TINY).state_dict() if state is None else state
    torch.save({"format": MODEL_FORMAT, "network_def": network_def, "state_dict": state,
                "settings": {"spatial_size": list(SHAPE)}}, path)
    return path


def _vector_nifti(path, field):
    """A displacement field file as ITK writes one ([X, Y, Z, 1, 3], vector intent)."""
    image = nib.Nifti1Image(field.astype(np.float32)[:, :, :, None, :], np.diag([2.0, 2.0, 3.0, 1.0]))
    image.header.set_intent("vector")
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, server):
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    labels = (image * 3).round().astype(np.uint8)
    f = {"dir": d, "server": server}
    f["model"] = save_registration_model(d / "m.pt", multistep_registration(**TINY), TINY_DEF, spatial_size=SHAPE)
    f["img"] = _nifti(d / "img.nii.gz", image)
    f["img2"] = _nifti(d / "img2.nii.gz", np.roll(image, 1, axis=0))
    f["label"] = _nifti(d / "label.nii.gz", labels)
    f["big_label"] = _nifti(d / "big_label.nii.gz", (labels.astype(np.int32) * 500_000))
    f["nan_img"] = _nifti(d / "nan_img.nii.gz", np.where(image > 0.9, np.nan, image).astype(np.float32))
    f["inf_img"] = _nifti(d / "inf_img.nii.gz", np.where(image > 0.9, np.inf, image).astype(np.float32))
    f["nan_origin"] = _broken_header(d / "nan_origin.nii", image, **{"srow_x:3": np.nan})
    f["nan_rotation"] = _broken_header(d / "nan_rotation.nii", image, **{"srow_y:0": np.nan})
    zero_column = {"srow_x:1": 0.0, "srow_y:1": 0.0, "srow_z:1": 0.0}
    f["zero_column"] = _broken_header(d / "zero_column.nii", image, **zero_column)
    f["nan_qform"] = _broken_header(d / "nan_qform.nii", image, sform_code=0, qform_code=1, quatern_b=np.nan)
    f["zero_pixdim"] = _broken_header(d / "zero_pixdim.nii", image, sform_code=0, qform_code=0,
                                      pixdim=[1.0, 2.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    field = rng.normal(0.0, 0.5, (*SHAPE, 3))
    f["ddf"] = _vector_nifti(d / "ddf.nii.gz", field)
    f["nan_ddf"] = _vector_nifti(d / "nan_ddf.nii.gz", np.where(field > 1.0, np.nan, field))
    f["inf_ddf"] = _vector_nifti(d / "inf_ddf.nii.gz", np.where(field > 1.0, np.inf, field))
    f["slice_ddf"] = _vector_nifti(d / "slice_ddf.nii.gz", field[:1])
    nan_state = multistep_registration(**TINY).state_dict()
    key = next(k for k, v in nan_state.items() if v.is_floating_point())
    nan_state[key] = nan_state[key].clone().fill_(float("nan"))
    f["nan_weights"] = _model_file(d / "nan_weights.pt", state=nan_state)
    inf_state = multistep_registration(**TINY).state_dict()
    inf_state[key] = inf_state[key].clone().fill_(float("inf"))
    f["inf_weights"] = _model_file(d / "inf_weights.pt", state=inf_state)
    f["not_torch"] = d / "not_torch.pt"
    f["not_torch"].write_bytes(os.urandom(4096))
    f["truncated_model"] = d / "truncated.pt"
    f["truncated_model"].write_bytes(Path(f["model"]).read_bytes()[:3000])
    secret = d / "secret.txt"
    secret.write_text("secret")
    hostile = {
        "hovernet_url": {"_target_": "monai.networks.nets.HoVerNet", "pretrained_url": f"{server}/secret.txt"},
        "hovernet_file_url": {"_target_": "monai.networks.nets.HoVerNet", "pretrained_url": f"file://{secret}"},
        "densenet_pretrained": {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, "in_channels": 2,
                                "out_channels": 3, "pretrained": True},
        "efficientnet_default": {"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0"},
        "identity": {"_target_": "torch.nn.Identity"},
        "bare_module": {"_target_": "torch.nn.Module"},
        "huge_embedding": {"_target_": "monai_icon.networks.RegistrationNet", "block": {
            "_target_": "monai_icon.networks.DisplacementField",
            "net": {"_target_": "torch.nn.Embedding", "num_embeddings": 10**6, "embedding_dim": 10**6}}},
        "path_argument": {**TINY_DEF, "coarse_pool": str(secret)},
    }
    for name, spec in hostile.items():
        f[name] = _model_file(d / f"{name}.pt", spec)
    out = d / "out"
    out.mkdir()
    f["out"] = out
    (d / "a_file").write_text("not a folder")
    f["a_file"] = d / "a_file"
    os.symlink(f["img"], d / "img_link.nii.gz")
    f["img_link"] = d / "img_link.nii.gz"
    os.link(f["img2"], d / "img2_hardlink.nii.gz")
    f["img2_hardlink"] = d / "img2_hardlink.nii.gz"
    pair = {"fixed_image": str(f["img"]), "moving_image": str(f["img2"])}
    datalists = {
        "duplicate_ids": [{**pair, "pair_id": "a"}, {**pair, "pair_id": "a"}],
        "explicit_default_id": [pair, {**pair, "pair_id": "pair000"}],
        "null_path": [{**pair, "moving_image": None}],
        "numeric_path": [{**pair, "fixed_image": 12}],
        "long_id": [{**pair, "pair_id": "x" * 300}],
        "nul_id": [{**pair, "pair_id": "a\0b"}],
        "folder_id": [{**pair, "pair_id": "../escape"}],
        "output_is_input": [{"fixed_image": str(out / "p_warped.nii.gz"), "moving_image": str(f["img2"]),
                             "pair_id": "p"}],
        "second_pair_fails": [{**pair, "pair_id": "good"},
                              {"fixed_image": str(f["img"]), "moving_image": str(f["nan_img"]), "pair_id": "bad"}],
    }
    (out / "p_warped.nii.gz").write_bytes(Path(f["img"]).read_bytes())  # an input that a pair's output would hit
    for name, pairs in datalists.items():
        f[name] = d / f"{name}.json"
        f[name].write_text(json.dumps({"pairs": pairs}))
    f["deep_json"] = d / "deep.json"
    f["deep_json"].write_text("[" * 200_000 + "]" * 200_000)
    f["datalist_in_out"] = out / "summary.json"
    f["datalist_in_out"].write_text(json.dumps({"pairs": [pair]}))
    return f


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


REGISTER = ["register", "--fixed", "{img}", "--moving", "{img2}", "--model", "{model}"]
WARPED = ["--warped", "{out}/w.nii.gz"]


def _register_with(model):
    return ["register", "--fixed", "{img}", "--moving", "{img2}", "--model", "{%s}" % model] + WARPED


CASES = {
    # model files are inert data
    "model reaches a URL": (_register_with("hovernet_url"), "would fetch pretrained weights"),
    "model copies a local file by URL": (_register_with("hovernet_file_url"), "would fetch pretrained weights"),
    "model downloads pretrained weights": (_register_with("densenet_pretrained"), "pretrained=True would fetch"),
    "model class downloads by default": (_register_with("efficientnet_default"), "by default pretrained=True"),
    "model is not a registration network": (_register_with("identity"), "not a registration network"),
    "model is a bare Module": (_register_with("bare_module"), "not a registration network"),
    "model too large for memory": (_register_with("huge_embedding"), "more than the budget"),
    "model argument names a file": (_register_with("path_argument"), "looks like a file path or URL"),
    "model weights hold NaN": (_register_with("nan_weights"), "NaN or infinite value(s); the file is corrupt"),
    "model weights hold inf": (_register_with("inf_weights"), "NaN or infinite value"),
    "model file is not a torch file": (_register_with("not_torch"), "cannot read"),
    "model file is truncated": (_register_with("truncated_model"), "cannot read"),
    # outputs never overwrite inputs
    "warped is the moving image": (REGISTER + ["--warped", "{img2}"], "would overwrite the moving image"),
    "warped is a symlink to the fixed image": (REGISTER + ["--warped", "{img_link}"],
                                               "would overwrite the fixed image"),
    "ddf is a hard link to the moving image": (REGISTER + ["--ddf", "{img2_hardlink}"],
                                               "would overwrite the moving image"),
    "ddf is the fixed image": (REGISTER + ["--ddf", "{img}"], "would overwrite the fixed image"),
    "warped label is the label": (REGISTER + ["--moving-label", "{label}", "--warped-label", "{label}"],
                                  "would overwrite the moving label"),
    "warp output is its input": (["warp", "--moving", "{img}", "--transform", "{ddf}", "--output", "{img}"],
                                 "would overwrite the moving image"),
    "warp output is the transform": (["warp", "--moving", "{img}", "--transform", "{ddf}", "--output", "{ddf}"],
                                     "would overwrite the transform"),
    "jacobian output is the transform": (["jacobian", "--transform", "{ddf}", "--output", "{ddf}"],
                                         "would overwrite the transform"),
    # non-finite values and broken geometry
    "NaN in the fixed image": (["register", "--fixed", "{nan_img}", "--moving", "{img2}", "--model", "{model}"]
                               + WARPED, "NaN or infinite value"),
    "inf in the moving image": (["register", "--fixed", "{img}", "--moving", "{inf_img}", "--model", "{model}"]
                                + WARPED, "NaN or infinite value"),
    "NaN in a NIfTI origin": (["register", "--fixed", "{nan_origin}", "--moving", "{img2}", "--model", "{model}"]
                              + WARPED, "NaN or infinite values in its sform"),
    "NaN in a NIfTI rotation": (["register", "--fixed", "{img}", "--moving", "{nan_rotation}", "--model",
                                 "{model}"] + WARPED, "NaN or infinite values in its sform"),
    "zero column in a NIfTI sform": (["register", "--fixed", "{zero_column}", "--moving", "{img2}", "--model",
                                      "{model}"] + WARPED, "degenerate voxel spacing in its sform"),
    "NaN in a NIfTI qform": (["register", "--fixed", "{nan_qform}", "--moving", "{img2}", "--model", "{model}"]
                             + WARPED, "NaN or infinite values in its qform"),
    "zero voxel size in a NIfTI": (["register", "--fixed", "{zero_pixdim}", "--moving", "{img2}", "--model",
                                    "{model}"] + WARPED, "voxel sizes (pixdim)"),
    "NaN displacements to warp": (["warp", "--moving", "{img}", "--transform", "{nan_ddf}", "--output",
                                   "{out}/w.nii.gz"], "NaN or infinite displacement"),
    "inf displacements to warp": (["warp", "--moving", "{img}", "--transform", "{inf_ddf}", "--output",
                                   "{out}/w.nii.gz"], "NaN or infinite displacement"),
    "NaN displacements to jacobian": (["jacobian", "--transform", "{nan_ddf}"], "NaN or infinite displacement"),
    "NaN image to warp": (["warp", "--moving", "{nan_img}", "--transform", "{ddf}", "--output", "{out}/w.nii.gz"],
                          "NaN or infinite value"),
    "one-slice field to jacobian": (["jacobian", "--transform", "{slice_ddf}"], "at least 2 voxels along every"),
    # hostile pair datalists
    "duplicate pair ids": (["register-pairs", "--datalist", "{duplicate_ids}", "--model", "{model}",
                            "--output-dir", "{out}/pairs"], "the same pair_id 'a'"),
    "explicit id equal to a default": (["register-pairs", "--datalist", "{explicit_default_id}", "--model",
                                        "{model}", "--output-dir", "{out}/pairs"], "the same pair_id 'pair000'"),
    "null path": (["register-pairs", "--datalist", "{null_path}", "--model", "{model}", "--output-dir",
                   "{out}/pairs"], "moving_image must be a file path"),
    "numeric path": (["register-pairs", "--datalist", "{numeric_path}", "--model", "{model}", "--output-dir",
                      "{out}/pairs"], "fixed_image must be a file path"),
    "JSON nested 200,000 deep": (["register-pairs", "--datalist", "{deep_json}", "--model", "{model}",
                                  "--output-dir", "{out}/pairs"], "nested too deeply"),
    "300-character pair id": (["register-pairs", "--datalist", "{long_id}", "--model", "{model}", "--output-dir",
                               "{out}/pairs"], "must be a plain file name stem"),
    "NUL in a pair id": (["register-pairs", "--datalist", "{nul_id}", "--model", "{model}", "--output-dir",
                          "{out}/pairs"], "must be a plain file name stem"),
    "folder in a pair id": (["register-pairs", "--datalist", "{folder_id}", "--model", "{model}", "--output-dir",
                             "{out}/pairs"], "must be a plain file name stem"),
    "output dir is a file": (["register-pairs", "--datalist", "{duplicate_ids}", "--model", "{model}",
                              "--output-dir", "{a_file}"], "is a file"),
    "a pair's output is another pair's input": (["register-pairs", "--datalist", "{output_is_input}", "--model",
                                                 "{model}", "--output-dir", "{out}"], "would overwrite"),
    "summary would overwrite the datalist": (["register-pairs", "--datalist", "{datalist_in_out}", "--model",
                                              "{model}", "--output-dir", "{out}"], "would overwrite the datalist"),
    # numeric flags beyond the inputs or the memory
    "passes 1000000": (REGISTER + WARPED + ["--passes", "1000000"], "--passes must be at most 16"),
    "lncc kernel 10001": (REGISTER + WARPED + ["--similarity", "lncc", "--lncc-kernel", "10001"],
                          "larger than the grid"),
    "huge io size": (REGISTER + WARPED + ["--io-mode", "residual", "--io-size", "100000,100000,100000"],
                     "--io-size [100000, 100000, 100000] is"),
    "huge spatial size": (REGISTER + WARPED + ["--spatial-size", "100000,100000,1000"], "--spatial-size"),
    "io size of the wrong dimension": (REGISTER + WARPED + ["--io-mode", "residual", "--io-size", "32,32"],
                                       "must have 3 values"),
    "flip axes not numbers": (REGISTER + WARPED + ["--flip-axes", "x"], "expected integers"),
    "flip axis out of range": (REGISTER + WARPED + ["--flip-axes", "5"], "must be axes of the model"),
    "negative flip passes": (REGISTER + WARPED + ["--ensemble", "--flip-passes", "-1"], "--flip-passes must be"),
    "io levels 50": (REGISTER + WARPED + ["--io-mode", "residual", "--io-steps", "1", "--io-levels", "50"],
                     "more than the residual grid"),
    "synthetic knees of an absurd shape": (["synthetic-knees", "{out}/knees", "--shape", "100000,100000,100000"],
                                           "memory"),
    "synthetic knees into a file": (["synthetic-knees", "{a_file}", "--subjects", "1", "--shape", "8,8,4"],
                                    "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_in_one_line_and_changes_nothing(work, capsys, monkeypatch, case):
    argv, message = CASES[case]
    monkeypatch.setenv("TORCH_HOME", str(work["dir"] / "torch_home"))  # where a download would land
    before = _snapshot(work["dir"])
    requests_before = len(_Requests.received)
    try:
        code = main([a.format(**{k: str(v) for k, v in work.items()}) for a in argv])
    except SystemExit as stop:  # a usage error (argparse): one line too
        code = stop.code
    err = capsys.readouterr().err
    assert code in (1, 2) and code != 0, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert _snapshot(work["dir"]) == before, "an input changed or a file was written"
    assert len(_Requests.received) == requests_before, "the model file reached the network"
    assert not list(work["dir"].rglob("*partial*"))
    assert not (work["dir"] / "torch_home").exists(), "the model file fetched something"


def test_a_failing_pair_is_named_and_earlier_pairs_are_kept(work, capsys, tmp_path):
    code = main(["register-pairs", "--datalist", str(work["second_pair_fails"]), "--model", str(work["model"]),
                 "--output-dir", str(tmp_path / "pairs")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pair bad (pair 2 of 2" in err and "nan_img" in err and "NaN or infinite" in err, err
    written = sorted(p.name for p in (tmp_path / "pairs").iterdir())
    assert written == ["good_ddf.nii.gz", "good_phi.h5", "good_warped.nii.gz"], written


def test_labels_of_any_value_are_warped_without_one_channel_per_value(work, capsys, tmp_path):
    """A label of 10**6 costs what 1 does (one channel per label present); the values come back as they were."""
    code = main(["warp", "--moving", str(work["big_label"]), "--transform", str(work["ddf"]), "--output",
                 str(tmp_path / "wl.nii.gz"), "--mode", "label"])
    assert code == 0, capsys.readouterr().err
    values = np.unique(np.asarray(nib.load(tmp_path / "wl.nii.gz").dataobj))
    assert set(values.tolist()) <= {0, 500_000, 1_000_000, 1_500_000} and 1_500_000 in values


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(work, capsys, monkeypatch):
    import monai_icon.apps.transform_files as transform_files

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(transform_files, "jacobian_file", broken)
    assert main(["jacobian", "--transform", str(work["ddf"])]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "monai-icon jacobian: error: RuntimeError: something unexpected", err
    with pytest.raises(RuntimeError, match="something"):
        main(["--debug", "jacobian", "--transform", str(work["ddf"])])
    monkeypatch.setenv("MONAI_ICON_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something"):
        main(["jacobian", "--transform", str(work["ddf"])])


_WRITE_FAILURE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from monai_icon.apps.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("flag,name", [("--warped", "w.nii.gz"), ("--warped", "w.nii"), ("--warped", "w.mha"),
                                       ("--warped", "w.mhd"), ("--warped", "w.nrrd"), ("--ddf", "d.nii"),
                                       ("--transform", "t.h5")])
def test_a_failed_write_leaves_the_earlier_file_and_one_line(tmp_path, flag, name):
    """A file-size limit (as a full disk) during the write: exit status 2, one line, no crash (HDF5 segfaults on
    a failed close in-process), the earlier output intact, no partial file."""
    rng = np.random.default_rng(1)
    fixed = _nifti(tmp_path / "fixed.nii.gz", rng.random((40, 40, 20)).astype(np.float32))
    moving = _nifti(tmp_path / "moving.nii.gz", rng.random((40, 40, 20)).astype(np.float32))
    model = save_registration_model(tmp_path / "m.pt", multistep_registration(**TINY), TINY_DEF, spatial_size=SHAPE)
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / name
    earlier.write_bytes(b"the earlier output")
    argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model), flag, str(earlier)]
    result = subprocess.run([sys.executable, "-c", _WRITE_FAILURE.format(limit=16 * 1024, argv=argv)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if "Warning" not in line and line.strip()]
    assert len(lines) == 1 and "could not write" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert earlier.read_bytes() == b"the earlier output"
    assert sorted(p.name for p in out.iterdir()) == [name], sorted(p.name for p in out.iterdir())
