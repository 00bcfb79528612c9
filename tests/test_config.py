"""Config loading: defaults, YAML files, --set overrides, and errors that name file and key."""

import json
from pathlib import Path

import pytest

from fedpanfm.config import ConfigError, DataConfig, ExperimentConfig, config_from_dict, load_config
from fedpanfm.organs import DEFAULT_ORGANS, OrganSet


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_cover_every_organ():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert set(cfg.data.organs) == set(DEFAULT_ORGANS)
    assert cfg.data.organ_set().names == DEFAULT_ORGANS


def test_yaml_merges_into_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  depth: 2\n  dex:\n    experts: 8\ndata:\n  organs:\n    brain:\n      grid: [8, 8, 8]\n"))
    assert cfg.model.depth == 2
    assert cfg.model.dex.experts == 8
    assert cfg.model.dex.top_k == 2  # untouched default
    assert cfg.data.organs["brain"].grid == [8, 8, 8]
    assert cfg.data.organs["brain"].patch == [4, 4, 4]  # merged with the default spec
    assert cfg.data.organs["heart"].grid == [32, 32]


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  depth: 2\n"), ["model.depth=4", "federation.rounds=10", "train.masking.policy=random"])
    assert cfg.model.depth == 4 and cfg.federation.rounds == 10
    assert cfg.train.masking.policy == "random"


def test_set_reads_exponent_floats_without_a_dot():
    # YAML 1.1 alone would read "1e-4" as a string and the float field would refuse it.
    cfg = load_config(None, ["train.lr=1e-4", "train.min_lr=2E-6", "name=1e3x"])
    assert cfg.train.lr == 1e-4 and cfg.train.min_lr == 2e-6 and cfg.name == "1e3x"


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  dpeth: 3\n", "model.dpeth"),
        ("model:\n  depth: three\n", "model.depth"),
        ("model:\n  depth: 0\n", "model.depth"),
        ("train:\n  masking:\n    policy: everything\n", "train.masking.policy"),
        ("train:\n  masking:\n    organ_mask_ratio: 1.5\n", "train.masking.organ_mask_ratio"),
        ("data:\n  organs:\n    lung:\n      grid: [8, 8]\n      patch: [4, 4]\n", "data.organs.lung"),
        ("data:\n  organs:\n    brain:\n      patch: [3, 3, 3]\n", "data.organs.brain.patch"),
        ("deepspeed:\n  bf16: 1\n", "deepspeed.bf16"),
    ],
)
def test_errors_name_file_and_dotted_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert key in str(err.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match="model.dept"):
        load_config(None, ["model.dept=4"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["model.depth"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_extra_organs_extend_the_vocabulary(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  extra_organs: [lung]\n  organs:\n    lung:\n      grid: [16, 16]\n      patch: [4, 4]\n"))
    organs = cfg.data.organ_set()
    assert organs.names[-1] == "lung" and organs.index("lung") == len(DEFAULT_ORGANS)
    with pytest.raises(ConfigError, match="no preprocessing spec for lung"):
        load_config(None, ["data.extra_organs=[lung]"])


def test_organ_set_rejects_unknown_and_duplicates():
    with pytest.raises(KeyError, match="unknown organ 'lung'"):
        OrganSet().index("lung")
    with pytest.raises(ValueError):
        OrganSet(("brain", "brain"))


@pytest.mark.parametrize("name", ["x/../y", "../etc", "abc\n", "a" * 64, ""])
def test_site_subjects_keys_are_checked_site_names(tmp_path, name):
    # A site name becomes a folder name on the server (TensorBoard sub-runs): refused where it enters.
    path = write(tmp_path, f"federation:\n  site_subjects:\n    {json.dumps(name)}: 5\n")  # YAML reads JSON escapes
    with pytest.raises(ConfigError, match=r"exp\.yaml: federation\.site_subjects: .* is not a valid site name"):
        load_config(path)


def test_site_subjects_accepts_plain_names(tmp_path):
    cfg = load_config(write(tmp_path, "federation:\n  site_subjects:\n    hospital_a: 5\n    site-02: 7\n"))
    assert cfg.federation.site_subjects == {"hospital_a": 5, "site-02": 7}


def test_a_run_folder_written_with_the_old_memory_cache_switch_still_loads() -> None:
    # Run folders and checkpoints written before store data.memory_cache (a switch).
    assert config_from_dict({"data": {"memory_cache": False}}).data.memory_cache_mib == 0.0
    assert config_from_dict({"data": {"memory_cache": True}}).data.memory_cache_mib == DataConfig().memory_cache_mib
    with pytest.raises(ConfigError, match="data.memory_cache = 'yes'"):
        config_from_dict({"data": {"memory_cache": "yes"}})
