"""Package metadata lives in pyproject.toml alone, with one version (gaq_calc.__version__)."""

import importlib
from pathlib import Path

import pytest

import gaq_calc

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_is_in_pyproject_only():
    assert not (ROOT / "setup.cfg").exists(), "package metadata belongs in pyproject.toml [project]"
    assert not (ROOT / "setup.py").exists()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gaq_calc.__version__"}
    assert gaq_calc.__version__.count(".") == 2


def test_every_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"gaq-train", "gaq-eval", "gaq-export", "gaq-quantize", "gaq-report", "gaq-resave"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
