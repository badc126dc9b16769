"""The package's layering (DESIGN section 7): which module may load which."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_by(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(run.stdout))


def top(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_rules_load_no_trio_fuse_qemu_or_engine():
    loaded = loaded_by("import snapfs.rules")
    assert "snapfs.rules" in loaded
    assert not top(loaded) & {"trio", "pyfuse3", "lxml"}, sorted(loaded)
    assert not loaded & {"snapfs.qemu", "snapfs.engines", "snapfs.journal", "snapfs.store", "snapfs.api"}


@pytest.mark.parametrize("module", ["snapfs.domain", "snapfs.catalog", "snapfs.journal"])
def test_the_core_loads_no_fuse(module):
    assert "pyfuse3" not in top(loaded_by(f"import {module}"))


def test_the_package_still_offers_the_api_names():
    loaded = loaded_by("from snapfs import open_store, Store, DeactivateFlags; from snapfs.catalog import StoreCore")
    assert "snapfs.api" in loaded and "snapfs.catalog" in loaded
