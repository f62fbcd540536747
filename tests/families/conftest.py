"""Shared tiny models for the conformance suite: each family's tiny model is built once per session."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.families.table import Built, TinyFamily


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Callable[[TinyFamily], Built]:
    """`built(family)`: the family's tiny model on disk (built on first use, then shared)."""
    cache: dict[str, Built] = {}

    def get(family: TinyFamily) -> Built:
        if family.name not in cache:
            cache[family.name] = family.build(tmp_path_factory.mktemp(f"tiny_{family.name}"))
        return cache[family.name]
    return get
