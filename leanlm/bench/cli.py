"""Registers `leanlm eval ...` and `leanlm bench ...` (filled in by the bench modules)."""
from __future__ import annotations


def register(sub, add_model_args) -> None:
    pass
