"""Recipes, presets and calibration sets: found in the source tree, shipped in wheels, clear errors."""

from pathlib import Path

import pytest

from atexport import configs
from atexport.errors import BadInputError

ROOT = Path(__file__).resolve().parent.parent


def test_every_config_folder_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for kind in configs.KINDS:
        assert data_files[f"share/atexport/{kind}"] == [f"{kind}/*.yaml"]
        assert list((ROOT / kind).glob("*.yaml")), kind


def test_source_tree_is_the_default_root_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEXPORT_CONFIG_ROOT", raising=False)
    assert configs.config_root() == ROOT
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "mine.yaml").write_text("epochs: 3\n")
    monkeypatch.setenv("ATEXPORT_CONFIG_ROOT", str(tmp_path))
    assert configs.available("training") == ["mine"]
    assert configs.load("training", "mine")["epochs"] == 3


def test_unknown_name_lists_what_exists():
    with pytest.raises(BadInputError, match="available: .*digits"):
        configs.resolve("training", "no-such-recipe")


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(BadInputError, match="bad.yaml: not valid YAML"):
        configs.load("training", bad)


def test_a_folder_named_like_a_config_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert configs.resolve("training", "digits").name == "digits.yaml"
