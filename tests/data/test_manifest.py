"""Site manifests: round trip, label / spacing parsing, per-subject label consistency."""

from __future__ import annotations

import pytest

from fedpanfm.data.manifest import (
    MANIFEST_NAME,
    CohortError,
    ManifestRow,
    parse_label,
    parse_spacing,
    read_manifest,
    write_manifest,
)
from fedpanfm.organs import OrganSet


def test_round_trip_keeps_rows_labels_spacing_and_row_numbers(tmp_path):
    rows = [
        ManifestRow("s1", "brain", "a.npy", {"dm": 1.0, "ht": None}, (1.0, 2.0, 3.5)),
        ManifestRow("s1", "heart", "b.nii.gz", {"dm": 1.0, "ht": None}),
        ManifestRow("s2", "liver", "c.nii", {"dm": 0.0, "ht": 1.0}),
    ]
    path = write_manifest(tmp_path / "site_a", rows, ["dm", "ht"])
    assert path.name == MANIFEST_NAME
    assert path.read_text().splitlines()[0] == "subject_id,organ,path,spacing,dm,ht"
    m = read_manifest(tmp_path / "site_a", OrganSet())
    assert m.rows == rows
    assert m.row_numbers == [2, 3, 4]
    assert m.label_names == ["dm", "ht"]
    assert m.subject_ids() == ["s1", "s2"]
    assert [n for n, _ in m.rows_by_subject()["s1"]] == [2, 3]
    assert m.site == "site_a" and m.bad == {}


def test_spacing_column_only_when_a_row_has_spacing(tmp_path):
    write_manifest(tmp_path, [ManifestRow("s1", "brain", "a.npy", {"x": 0.0})], ["x"])
    assert (tmp_path / MANIFEST_NAME).read_text().splitlines() == ["subject_id,organ,path,x", "s1,brain,a.npy,0"]


def test_parse_label_and_spacing():
    assert parse_label("1") == 1.0 and parse_label(" 0 ") == 0.0 and parse_label("") is None
    assert parse_label("1.0") == 1.0
    for bad in ("2", "yes", "-1", "nan", "0.5"):
        with pytest.raises(ValueError, match="not 0, 1 or empty"):
            parse_label(bad)
    assert parse_spacing("0.5;0.5") == (0.5, 0.5)
    assert parse_spacing("1;2;3") == (1.0, 2.0, 3.0)
    for bad in ("1", "1;2;3;4", "a;b", "1;-2", "0;1"):
        with pytest.raises(ValueError):
            parse_spacing(bad)


def _write(site, text):
    site.mkdir(parents=True, exist_ok=True)
    (site / MANIFEST_NAME).write_text(text)
    return site


def test_blank_lines_are_ignored_and_rows_numbered_as_in_the_file(tmp_path):
    site = _write(tmp_path / "s", "subject_id,organ,path\n\na,brain,x.npy\n\nb,heart,y.npy\n")
    m = read_manifest(site, OrganSet())
    assert m.row_numbers == [3, 5]


def test_labels_must_agree_between_a_subjects_rows(tmp_path):
    site = _write(tmp_path / "s", "subject_id,organ,path,dm\na,brain,x.npy,1\na,heart,y.npy,0\nb,heart,z.npy,0\n")
    with pytest.raises(CohortError, match=r"row 3.*differ from its row 2"):
        read_manifest(site, OrganSet())
    m = read_manifest(site, OrganSet(), on_bad="skip")
    assert list(m.bad) == ["a"]
    assert m.subject_ids() == ["b"]


def test_ragged_row_names_row(tmp_path):
    site = _write(tmp_path / "s", "subject_id,organ,path,dm\na,brain,x.npy\n")
    with pytest.raises(CohortError, match=r"site 's'.*row 2.*x.npy.*3 cells, the header has 4"):
        read_manifest(site, OrganSet())


def test_extra_organs_from_the_vocabulary_are_accepted(tmp_path):
    site = _write(tmp_path / "s", "subject_id,organ,path\na,lung,x.npy\n")
    with pytest.raises(CohortError, match="unknown organ 'lung'"):
        read_manifest(site, OrganSet())
    assert read_manifest(site, OrganSet.with_extra(["lung"])).rows[0].organ == "lung"
