"""Bad cohort input: each case raises CohortError naming the site, the manifest row and the file;
with ``data.on_bad=skip`` the subject is left out with one warning line and counted."""

from __future__ import annotations

import logging
import re

import nibabel as nib
import numpy as np
import pytest
from conftest import make_site, tiny_config

from fedpanfm.data.dataset import SiteDataset
from fedpanfm.data.manifest import MANIFEST_NAME, CohortError
from fedpanfm.data.summary import summarize_site

# Manifest rows: 2 s0 brain, 3 s0 heart, 4 s1 heart, 5 s2 liver.
SUBJECTS = {"s0": ["brain", "heart"], "s1": ["heart"], "s2": ["liver"]}


def _edit_manifest(site, old: str, new: str) -> None:
    path = site / MANIFEST_NAME
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def missing_file(site):
    (site / "img" / "s1_heart.nii.gz").unlink()


def corrupt_file(site):
    (site / "img" / "s0_heart.nii.gz").write_bytes(b"this is not gzip, nor NIfTI" * 10)


def unknown_organ(site):
    _edit_manifest(site, "s2,liver,", "s2,lung,")


def wrong_dims(site):
    nib.save(nib.Nifti1Image(np.zeros((12, 12), np.float32), np.eye(4)), str(site / "img" / "s2_liver.nii.gz"))


def duplicate_row(site):
    with (site / MANIFEST_NAME).open("a") as fh:
        fh.write("s1,heart,img/s1_heart.nii.gz,1,\n")


def bad_label(site):
    _edit_manifest(site, "s2,liver,img/s2_liver.nii.gz,0,0", "s2,liver,img/s2_liver.nii.gz,2,0")


CASES = [
    (missing_file, "s1", 4, "img/s1_heart.nii.gz", "not found"),
    (corrupt_file, "s0", 3, "img/s0_heart.nii.gz", "not a readable NIfTI"),
    (unknown_organ, "s2", 5, "img/s2_liver.nii.gz", "unknown organ 'lung'"),
    (wrong_dims, "s2", 5, "img/s2_liver.nii.gz", r"organ 'liver' needs a 3D image \(grid \[8, 8, 8\]\), the file holds shape \(12, 12\)"),
    (duplicate_row, "s1", 6, "img/s1_heart.nii.gz", "duplicate row for subject 's1', organ 'heart' \\(first at row 4\\)"),
    (bad_label, "s2", 5, "img/s2_liver.nii.gz", "column 'diabetes': label value '2' is not 0, 1 or empty"),
]


@pytest.mark.parametrize("corrupt, subject, row, file, what", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_row_raises_naming_site_row_and_file(tmp_path, corrupt, subject, row, file, what):
    cfg = tiny_config()
    site = tmp_path / "site_a"
    make_site(site, cfg, SUBJECTS)
    corrupt(site)
    with pytest.raises(CohortError) as info:
        SiteDataset(site, cfg)
    msg = str(info.value)
    assert f"site 'site_a' ({site})" in msg
    assert f"manifest.csv row {row}, file {file}" in msg
    assert re.search(what, msg), msg


@pytest.mark.parametrize("corrupt, subject, row, file, what", CASES, ids=[c[0].__name__ for c in CASES])
def test_skip_policy_leaves_out_the_whole_subject(tmp_path, caplog, corrupt, subject, row, file, what):
    cfg = tiny_config(["data.on_bad=skip"])
    site = tmp_path / "site_a"
    make_site(site, cfg, SUBJECTS)
    corrupt(site)
    with caplog.at_level(logging.WARNING, logger="fedpanfm.data.dataset"):
        ds = SiteDataset(site, cfg)
    assert ds.skipped == [subject]
    assert ds.subject_ids == [s for s in SUBJECTS if s != subject]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and subject in warnings[0].getMessage() and f"row {row}" in warnings[0].getMessage()
    for i in range(len(ds)):  # the rest still loads
        assert ds[i].subject_id != subject
    summary = summarize_site(site, cfg)
    assert summary.skipped == [subject] and summary.subjects == 2


def _no_manifest(site):
    (site / MANIFEST_NAME).unlink()


def _header_only(site):
    (site / MANIFEST_NAME).write_text("subject_id,organ,path,diabetes\n")


def _no_path_column(site):
    text = (site / MANIFEST_NAME).read_text().splitlines()
    (site / MANIFEST_NAME).write_text("\n".join(line.split(",", 2)[0] + ",heart" for line in text).replace(
        "subject_id,heart", "subject_id,organ", 1))


@pytest.mark.parametrize("on_bad", ["error", "skip"])
@pytest.mark.parametrize(
    "corrupt, what",
    [
        (_no_manifest, "empty site: no manifest.csv"),
        (_header_only, "empty site: manifest.csv has no rows"),
        (_no_path_column, r"manifest.csv row 1: missing required column\(s\) path"),
    ],
    ids=["no_manifest", "header_only", "missing_column"],
)
def test_structure_errors_always_raise(tmp_path, on_bad, corrupt, what):
    cfg = tiny_config([f"data.on_bad={on_bad}"])
    site = tmp_path / "site_a"
    make_site(site, cfg, SUBJECTS)
    corrupt(site)
    with pytest.raises(CohortError, match=f"site 'site_a' .*{what}"):
        SiteDataset(site, cfg)
