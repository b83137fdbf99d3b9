"""Other libraries' own tqdm bars (transformers' GGUF de-quantizing bar) kept off unless -v (issue 33)."""

from __future__ import annotations

import sys
import types

import pytest

from finemed_cli import console


@pytest.fixture
def library(monkeypatch):
    def tqdm(iterable, **kwargs):
        return kwargs

    module = types.ModuleType("fake_library_with_a_bar")
    module.tqdm = tqdm
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield module
    console.configure(0)


def test_the_bar_is_off_inside_the_block_and_restored_after(library):
    console.configure(0)
    original = library.tqdm
    with console.library_bars_off(library.__name__):
        assert library.tqdm([], desc="x") == {"desc": "x", "disable": True}
    assert library.tqdm is original


def test_verbose_leaves_the_bar_and_a_missing_module_is_no_error(library):
    console.configure(1)
    with console.library_bars_off(library.__name__):
        assert library.tqdm([]) == {}
    console.configure(0)
    with console.library_bars_off("no_such_module_here"):
        pass
