"""Image folders, ADM npz batches, decoding to RGB, bad files and `fdpipe evaluate --images`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from fdpipe.cli import main
from fdpipe.data import npz
from fdpipe.data.decode import adm_centre_crop
from fdpipe.data.imageset import open_image_set
from fdpipe.store import read_features, read_images, write_images

PIXELS = json.dumps({"pixels": {"family": "pixels", "options": {"size": 4}}})


def rgb_array(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_class_folder(root, classes=("a", "b"), per_class=3, size=(20, 24)) -> None:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rgb_array(*size, seed=10 * label + i)).save(root / name / f"{i}.png")


def make_mixed_folder(root) -> None:
    """Two files of each kind that needs a conversion, plus plain RGB images."""
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rgb_array(16, 16, i)).save(root / f"rgb{i}.png")
        gray = np.full((16, 16), 60 + i, dtype=np.uint8)
        Image.fromarray(gray, mode="L").save(root / f"gray{i}.png")
        rgba = np.dstack([rgb_array(16, 16, 5 + i), np.full((16, 16), 128, np.uint8)])
        Image.fromarray(rgba, mode="RGBA").save(root / f"alpha{i}.png")
        Image.fromarray(rgb_array(16, 16, 7 + i)).convert("CMYK").save(root / f"cmyk{i}.jpg")
        deep = np.full((16, 16), 257 * (100 + i), dtype=np.uint16)
        Image.fromarray(deep).save(root / f"deep{i}.png")
        Image.fromarray(rgb_array(16, 16, 9 + i)).convert("P").save(root / f"palette{i}.png")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_adm_crop_steps_by_hand():
    image = Image.fromarray(rgb_array(400, 600, 0))
    # 400 >= 2*64: BOX-halve to 300x200, again to 150x100; 100 < 128 stops.
    # BICUBIC scale 64/100 gives 96x64; the centre 64 columns start at 16.
    expected = image.resize((300, 200), Image.Resampling.BOX)
    expected = expected.resize((150, 100), Image.Resampling.BOX)
    expected = np.asarray(expected.resize((96, 64), Image.Resampling.BICUBIC))[:, 16:80]
    out = adm_centre_crop(image, 64)
    assert out.shape == (64, 64, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_adm_crop_upsamples_small_images():
    out = adm_centre_crop(Image.fromarray(rgb_array(10, 14, 1)), 32)
    assert out.shape == (32, 32, 3)


def test_folder_set_labels_and_batches(tmp_path):
    make_class_folder(tmp_path / "train")
    image_set = open_image_set(tmp_path / "train", resolution=16)
    batches = list(image_set.batches(4))
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    labels = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert image_set.count == 6


def test_folder_default_resolution_is_short_side(tmp_path):
    make_class_folder(tmp_path / "train", size=(20, 24))
    assert open_image_set(tmp_path / "train").resolution == 20


def test_manifest_then_extract(tmp_path, capsys):
    make_class_folder(tmp_path / "data" / "val", per_class=2)
    manifest = tmp_path / "val.manifest.json"
    code, _ = run_cli(capsys, "prepare", "--dataset", "imagefolder", "--root",
                      str(tmp_path / "data"), "--split", "test", "--source", "val",
                      "--resolution", "16", "--out", str(manifest))
    assert code == 0
    content = json.loads(manifest.read_text())
    assert content["classes"] == ["a", "b"]
    assert content["count"] == 4
    assert [label for _, label in content["files"]] == [0, 0, 1, 1]
    out = tmp_path / "features.h5"
    code, _ = run_cli(capsys, "extract", "--space", "pixels", "--spec", json.dumps(
        {"family": "pixels", "options": {"size": 4}}), "--images", str(manifest),
        "--batch-size", "3", "--device", "cpu", "--out", str(out))
    assert code == 0
    features, labels, attrs = read_features(out)
    assert features.shape == (4, 16)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert attrs["image_kind"] == "folder"
    assert attrs["resolution"] == 16


def test_manifest_rejects_bad_file(tmp_path, capsys, caplog):
    make_class_folder(tmp_path / "train", per_class=2)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    manifest = tmp_path / "m.json"
    argv = ["prepare", "--dataset", "imagefolder", "--root", str(tmp_path), "--split", "train",
            "--resolution", "16", "--out", str(manifest)]
    code, _ = run_cli(capsys, *argv)
    assert code == 1
    assert "notes.txt" in caplog.text
    assert not manifest.exists()
    code, _ = run_cli(capsys, *argv, "--skip-bad-images")
    assert code == 0
    assert json.loads(manifest.read_text())["count"] == 4
    report = json.loads((tmp_path / "m.json.bad_images.json").read_text())
    assert report["count"] == 1


def test_h5_set_streams_same_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(7)
    write_images(tmp_path / "x.h5", images, labels)
    image_set = open_image_set(tmp_path / "x.h5")
    got = np.concatenate([b[0] for b in image_set.batches(3)])
    np.testing.assert_array_equal(got, read_images(tmp_path / "x.h5")[0])


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_set_streams_adm_batch(tmp_path, compressed):
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "ref.npz", images, np.arange(5))
    image_set = open_image_set(tmp_path / "ref.npz")
    batches = list(image_set.batches(2))
    got = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(got, images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(5))
    assert image_set.resolution == 8


def test_npz_wrong_dtype_named(tmp_path):
    np.savez(tmp_path / "bad.npz", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError) as err:
        open_image_set(tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value)
    assert "uint8" in str(err.value)


def test_export_npz_round_trip(tmp_path, capsys):
    make_class_folder(tmp_path / "samples", per_class=2)
    out = tmp_path / "samples.npz"
    code, _ = run_cli(capsys, "export-npz", "--images", str(tmp_path / "samples"),
                      "--resolution", "16", "--batch-size", "3", "--out", str(out))
    assert code == 0
    with np.load(out) as data:
        exported = data["arr_0"]
    assert exported.shape == (4, 16, 16, 3)
    assert exported.dtype == np.uint8
    expected = np.concatenate([b[0] for b in open_image_set(tmp_path / "samples",
                                                            resolution=16).batches(10)])
    np.testing.assert_array_equal(exported, expected.transpose(0, 2, 3, 1))
    assert npz.read_header(out).shape == (4, 16, 16, 3)


def reference_stats(tmp_path, capsys) -> None:
    make_class_folder(tmp_path / "real", per_class=4, size=(16, 16))
    code, _ = run_cli(capsys, "stats", "--images", str(tmp_path / "real"), "--spec", PIXELS,
                      "--device", "cpu", "--out-dir", str(tmp_path / "stats"))
    assert code == 0


def test_evaluate_converts_each_kind_once(tmp_path, capsys, caplog):
    reference_stats(tmp_path, capsys)
    make_mixed_folder(tmp_path / "samples")
    caplog.set_level(logging.INFO)
    code, out = run_cli(capsys, "evaluate", "--images", str(tmp_path / "samples"), "--spec",
                        PIXELS, "--stats-dir", str(tmp_path / "stats"), "--device", "cpu",
                        "--normaliser", "pixels=2.0", "--out", str(tmp_path / "eval.json"))
    assert code == 0
    for kind in ("grayscale", "alpha", "CMYK", "16-bit", "palette"):
        notes = [r for r in caplog.records if f"converting {kind} images to RGB" in r.message]
        assert len(notes) == 1, kind
    result = json.loads((tmp_path / "eval.json").read_text())
    row = result["spaces"]["pixels"]
    assert row["n"] == 12
    assert row["fd"] > 0
    assert row["fdr"] == pytest.approx(row["fd"] / 2.0)
    assert result["fdr_k"] == pytest.approx(row["fdr"])
    assert "FDr^1" in out


def test_conversions_give_expected_pixels(tmp_path):
    make_mixed_folder(tmp_path / "samples")
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    images = np.concatenate([b[0] for b in open_image_set(tmp_path / "samples").batches(20)])
    by_name = dict(zip(files, images))
    assert by_name["gray0.png"].shape == (3, 16, 16)
    assert np.all(by_name["gray0.png"] == 60)
    assert np.all(by_name["deep1.png"] == 101)
    np.testing.assert_array_equal(by_name["alpha0.png"], rgb_array(16, 16, 5).transpose(2, 0, 1))


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_evaluate_stops_on_bad_file(tmp_path, capsys, caplog, kind):
    reference_stats(tmp_path, capsys)
    make_mixed_folder(tmp_path / "samples")
    jpeg = tmp_path / "samples" / "cmyk0.jpg"
    bad = {"truncated": tmp_path / "samples" / "cut.jpg",
           "text": tmp_path / "samples" / "readme.txt",
           "empty": tmp_path / "samples" / "empty.png"}[kind]
    if kind == "truncated":
        bad.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    elif kind == "text":
        bad.write_text("these are my samples")
    else:
        bad.write_bytes(b"")
    argv = ["evaluate", "--images", str(tmp_path / "samples"), "--spec", PIXELS,
            "--stats-dir", str(tmp_path / "stats"), "--device", "cpu",
            "--out", str(tmp_path / "eval.json")]
    code, _ = run_cli(capsys, *argv)
    assert code == 1
    assert bad.name in caplog.text
    assert "--skip-bad-images" in caplog.text
    assert not (tmp_path / "eval.json").exists()
    code, out = run_cli(capsys, *argv, "--skip-bad-images")
    assert code == 0
    assert "skipped 1 bad image(s)" in out
    report = json.loads((tmp_path / "eval.json.bad_images.json").read_text())
    assert report["count"] == 1
    assert report["files"][0]["file"].endswith(bad.name)
    assert json.loads((tmp_path / "eval.json").read_text())["spaces"]["pixels"]["n"] == 12


def test_evaluate_accepts_adm_reference_stats(tmp_path, capsys):
    make_class_folder(tmp_path / "samples", per_class=3, size=(16, 16))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "VIRTUAL_ref.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             mu=np.zeros(16), sigma=np.eye(16))
    code, out = run_cli(capsys, "evaluate", "--images", str(tmp_path / "samples"), "--spec",
                        PIXELS, "--stats", f"pixels={tmp_path / 'VIRTUAL_ref.npz'}",
                        "--device", "cpu")
    assert code == 0
    assert "pixels" in out
    assert "FDr^k not computed" in out
