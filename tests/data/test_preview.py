"""``fedpanfm cohort preview``: arrays equal to what training reads, mosaics, the before/after table."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from conftest import TINY, tiny_config
from matplotlib.image import imread
from nibabel.testing import data_path

from fedpanfm.cli import main
from fedpanfm.data.dataset import SiteDataset
from fedpanfm.data.manifest import ManifestRow, write_manifest
from fedpanfm.data.preview import MOSAIC_NAME, TABLE_NAME, mid_slices
from fedpanfm.data.readers import load_image

ANAT = Path(data_path) / "anatomical.nii"
EX4D = Path(data_path) / "example4d.nii.gz"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
SETS = ["data.organs.liver.frame=0", "data.organs.brain.spacing=[4, 4, 4]"]


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site_a"
    (site / "img").mkdir(parents=True)
    rows = []
    for sid, organ, src, modality in [("s1", "brain", ANAT, "MR"), ("s1", "heart", CT_SMALL, ""),
                                      ("s2", "liver", EX4D, ""), ("s2", "brain", ANAT, "")]:
        dst = site / "img" / f"{sid}_{src.name}"
        shutil.copy(src, dst)
        rows.append(ManifestRow(sid, organ, str(dst.relative_to(site)), {"dx": float(sid == "s2")}, modality=modality))
    write_manifest(site, rows, ["dx"])
    return site


def _config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def test_preview_writes_what_training_reads_mosaics_and_a_table(tmp_path, capsys):
    site, out = _site(tmp_path), tmp_path / "preview"
    args = ["cohort", "preview", str(site), "--config", _config(tmp_path), "--out", str(out)]
    assert main(args + [a for s in SETS for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "site 'site_a': 4 image(s) preprocessed" in printed and f"{out / TABLE_NAME}" in printed
    assert not (site / ".fedpanfm_cache").exists()  # nothing written into the site folder

    ds = SiteDataset(site, tiny_config(SETS + ["data.cache=false"]))
    for i, sid in enumerate(ds.subject_ids):
        for organ, x in ds[i].images.items():
            saved = np.load(out / sid / f"{organ}.npy", allow_pickle=False)
            assert saved.dtype == np.float32
            np.testing.assert_array_equal(saved, x.numpy())  # exactly the array the model sees
        png = imread(out / sid / MOSAIC_NAME)
        assert png.ndim == 3 and png.shape[0] > 100 and png[..., :3].std() > 0.05

    with (out / TABLE_NAME).open() as fh:
        table = {(r["subject_id"], r["organ"]): r for r in csv.DictReader(fh)}
    assert len(table) == 4 and all(r["error"] == "" for r in table.values())
    brain, heart, liver = table[("s1", "brain")], table[("s1", "heart")], table[("s2", "liver")]
    assert (brain["orientation"], brain["modality"], brain["normalize"]) == ("LAS", "MR", "foreground_zscore")
    assert (heart["orientation"], heart["modality"], heart["normalize"]) == ("SPL", "CT", "window")  # from the DICOM tag
    assert table[("s2", "brain")]["normalize"] == "zscore"  # NIfTI, no modality anywhere
    assert brain["shape_before"] == "33x41x25" and brain["spacing_before"] == "2x2x2"
    assert brain["shape_after"] == "8x8x8" and brain["spacing_after"] == "4x4x4"
    assert liver["shape_before"] == "128x96x24" and heart["spacing_after"] == heart["spacing_before"] == "0.6615x0.6615"
    raw = load_image(ANAT).array
    for p in (1, 50, 99):  # the table keeps 6 significant digits
        assert float(brain[f"p{p}_before"]) == pytest.approx(np.percentile(raw, p), rel=1e-5)
    after = np.load(out / "s1" / "heart.npy")
    assert float(heart["p99_after"]) == pytest.approx(np.percentile(after, 99), rel=1e-5, abs=1e-6)
    assert float(heart["p99_after"]) <= 1.0  # a CT window ends at 1


def test_preview_skips_bad_images_when_asked(tmp_path, capsys):
    site, out = _site(tmp_path), tmp_path / "preview"
    (site / "img" / "s2_example4d.nii.gz").unlink()
    args = ["cohort", "preview", str(site), "--config", _config(tmp_path), "--out", str(out)]
    assert main(args) == 1  # on_bad = error: the first bad image stops it, naming site, row and file
    assert "row 4, file img/s2_example4d.nii.gz" in capsys.readouterr().err
    assert main(args + ["--set", "data.on_bad=skip"]) == 0
    printed = capsys.readouterr().out
    assert "left out (1):" in printed and "s2 liver" in printed
    assert (out / "s2" / "brain.npy").is_file() and not (out / "s2" / "liver.npy").exists()


def test_mosaic_panels_carry_the_canonical_directions():
    vol = np.zeros((4, 5, 6))
    planes = mid_slices(vol, "RAS")
    assert [(p.shape, h, v) for p, h, v in planes] == [((4, 5), "R", "A"), ((4, 6), "R", "S"), ((5, 6), "A", "S")]
    assert [(h, v) for _, h, v in mid_slices(np.zeros((3, 4)), "AS")] == [("A", "S")]
