"""Modality-aware intensity: CT windows per organ, MR z-score over the foreground, the manifest's
``modality`` column, and the 4D frame choice, down to what SiteDataset yields."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from conftest import tiny_config
from nibabel.testing import data_path

from fedpanfm.config import ConfigError, OrganSpec, load_config
from fedpanfm.data.dataset import SiteDataset
from fedpanfm.data.intensity import normalize, resolve_method, resolve_modality
from fedpanfm.data.manifest import CohortError, ManifestRow, read_manifest, write_manifest
from fedpanfm.data.preprocess import preprocess

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
EX4D = Path(data_path) / "example4d.nii.gz"


def test_ct_window_clips_then_scales_to_unit_range():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(normalize(hu, "window", [], [-160.0, 240.0]).numpy(), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(hu, "window", [], [0.0, 80.0]).numpy(), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="window needs"):
        normalize(hu, "window", [], [10.0, 0.0])
    assert [resolve_method("auto", m) for m in ("CT", "MR", "PT", "")] == ["window", "foreground_zscore", "zscore", "zscore"]
    assert resolve_method("minmax", "CT") == "minmax"


def test_organ_windows_are_the_reading_presets_and_checked():
    organs = load_config().data.organs
    assert organs["brain"].window == [0.0, 80.0] and organs["liver"].window == [-160.0, 240.0]
    assert organs["brain"].normalize == "auto" and organs["brain"].modality == ""
    with pytest.raises(ConfigError, match=r"data.organs.liver.window: need \[low, high\]"):
        load_config(None, ["data.organs.liver.window=[100, 50]"])
    with pytest.raises(ConfigError, match="data.organs.liver.modality: 'ct' is not a DICOM modality code"):
        load_config(None, ["data.organs.liver.modality=ct"])


def test_mr_zscore_uses_the_foreground_not_the_air():
    rng = np.random.default_rng(0)
    mr = rng.normal(5.0, 2.0, size=(30, 30, 20)).clip(0)  # air: noise near 0
    mr[8:22, 6:24, 4:16] = rng.normal(500.0, 50.0, size=(14, 18, 12))  # tissue, 21 % of the field
    body = np.zeros(mr.shape, bool)
    body[8:22, 6:24, 4:16] = True
    spec = OrganSpec(grid=[30, 30, 20], patch=[1, 1, 1])
    out = preprocess(mr, (1.0, 1.0, 1.0), spec, "brain", "f", "MR")[0]
    assert out[body].mean() == pytest.approx(0.0, abs=1e-4) and out[body].std() == pytest.approx(1.0, abs=1e-3)
    assert out[~body].mean() < -5  # air sits far below the tissue, on the tissue's scale
    whole = preprocess(mr, (1.0, 1.0, 1.0), spec, "brain", "f", "")[0]  # unknown modality: whole image
    assert whole.mean() == pytest.approx(0.0, abs=1e-4) and whole[body].std() < 0.3


def test_modality_resolution_order_and_conflict():
    assert resolve_modality("MR", "", "CT", "f") == "MR"
    assert resolve_modality("", "CT", "MR", "f") == "CT"
    assert resolve_modality("", "", "MR", "f") == "MR"
    with pytest.raises(CohortError, match="f: manifest.csv says modality MR, the DICOM file says CT"):
        resolve_modality("MR", "CT", "", "f")


def _site(tmp_path: Path, rows: list[tuple[str, str, Path, str]]) -> Path:
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    out = []
    for sid, organ, src, modality in rows:
        dst = site / "img" / f"{sid}_{src.name}"
        shutil.copy(src, dst)
        out.append(ManifestRow(sid, organ, str(dst.relative_to(site)), {"dx": 0.0}, modality=modality))
    write_manifest(site, out, ["dx"])
    return site


def test_manifest_modality_column_round_trip_and_bad_cell(tmp_path):
    site = _site(tmp_path, [("a", "heart", CT_SMALL, "CT"), ("b", "heart", CT_SMALL, "")])
    assert (site / "manifest.csv").read_text().splitlines()[0] == "subject_id,organ,path,modality,dx"
    m = read_manifest(site, tiny_config().data.organ_set())
    assert [r.modality for r in m.rows] == ["CT", ""] and m.label_names == ["dx"]
    text = (site / "manifest.csv").read_text().replace(",CT,", ",c-t,")
    (site / "manifest.csv").write_text(text)
    with pytest.raises(CohortError, match=r"row 2, file img/a_CT_small.dcm: modality 'C-T' is not a DICOM modality"):
        read_manifest(site, tiny_config().data.organ_set())


def test_dataset_windows_ct_dicom_from_its_own_tag_and_refuses_a_contradicting_manifest(tmp_path):
    site = _site(tmp_path, [("ct", "heart", CT_SMALL, "")])
    cfg = tiny_config(["data.cache=false", "data.organs.heart.window=[-1000, 1000]"])
    x = SiteDataset(site, cfg)[0].images["heart"][0].numpy()
    hu = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float64)[::-1, ::-1].T - 1024.0
    np.testing.assert_allclose(x, (np.clip(hu, -1000, 1000) + 1000)[56:72, 56:72] / 2000, atol=1e-6)  # grid 16 of 128
    site2 = _site(tmp_path / "2", [("ct", "heart", CT_SMALL, "MR")])
    with pytest.raises(CohortError, match=r"row 2, file img/ct_CT_small.dcm: manifest.csv says modality MR, the DICOM file says CT"):
        SiteDataset(site2, cfg)


def test_organ_default_modality_applies_to_nifti_without_a_cell(tmp_path):
    anat = Path(data_path) / "anatomical.nii"
    site = _site(tmp_path, [("a", "brain", anat, ""), ("b", "brain", anat, "MR")])
    ds = SiteDataset(site, tiny_config(["data.cache=false", "data.organs.brain.modality=CT",
                                        "data.organs.brain.window=[0, 30000]"]))
    windowed, zscored = ds[0].images["brain"], ds[1].images["brain"]
    assert 0.0 <= float(windowed.min()) and float(windowed.max()) <= 1.0  # CT default: a window
    assert float(zscored.min()) < -1.0  # the manifest's MR wins: foreground z-score


def test_4d_image_needs_a_frame_choice_and_gets_it(tmp_path):
    site = _site(tmp_path, [("f", "brain", EX4D, "")])
    with pytest.raises(CohortError, match=r"\(128, 96, 24, 2\) \(4D\) \(set data.organs.brain.frame"):
        SiteDataset(site, tiny_config())
    ds = SiteDataset(site, tiny_config(["data.cache=false", "data.organs.brain.frame=1",
                                        "data.organs.brain.normalize=none"]))
    got = ds[0].images["brain"][0].numpy()
    vol = nibabel.as_closest_canonical(nibabel.load(EX4D).slicer[..., 1]).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(got, vol[60:68, 44:52, 8:16])  # centre crop of (128, 96, 24) to 8^3
