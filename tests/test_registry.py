"""leanclip.registry: a cached starter built by an older recipe is rebuilt on next use (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanclip import registry


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEANCLIP_HOME", str(tmp_path))
    monkeypatch.delenv("LEANCLIP_MODEL", raising=False)
    return tmp_path


def _cache_starter(recipe):
    path = registry.model_path("starter")
    path.mkdir(parents=True)
    extra = {} if recipe is None else {"starter": {"recipe": recipe}}
    (path / registry.MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "extra": extra}))
    return path


@pytest.mark.parametrize("recipe", [None, 1])
def test_an_outdated_cached_starter_is_rebuilt(home, monkeypatch, recipe):
    _cache_starter(recipe)
    built = []
    monkeypatch.setattr(registry, "build_starter", lambda: built.append(1) or registry.model_path("starter"))
    assert registry.resolve() == registry.model_path("starter")
    assert built == [1]


def test_a_current_cached_starter_is_used_as_is(home, monkeypatch):
    path = _cache_starter(registry.STARTER_RECIPE)
    monkeypatch.setattr(registry, "build_starter", lambda: pytest.fail("rebuilt a current starter"))
    assert registry.resolve() == path
    # build=False never builds, outdated or not
    assert registry.resolve(build=False) == path


def test_the_recipe_matches_the_builder():
    from leanclip.starter import STARTER_RECIPE  # needs the starter extra (torch), as the tests do

    assert registry.STARTER_RECIPE == STARTER_RECIPE
