"""The committed tiny models are exactly what fixtures/make_models.py makes from its seed."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "safetensors", "tokenizers")),
                    reason="needs torch, safetensors and tokenizers")
def test_make_models_reproduces_committed_files_bit_for_bit(tmp_path):
    make_all = runpy.run_path(str(FIXTURES / "make_models.py"))["make_all"]
    make_all(tmp_path)
    committed = sorted(p.relative_to(FIXTURES / "models") for p in (FIXTURES / "models").rglob("*") if p.is_file())
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / "models" / rel).read_bytes(), f"{rel} differs"
