"""Tier markers by folder: tests/<tier>/... gets the `<tier>` marker, so `-m unit` selects a tier."""

from pathlib import Path

import pytest

_TIERS = ("unit", "local", "apiserver", "cluster")
_ROOT = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = Path(item.path).relative_to(_ROOT).parts[0]
        except ValueError:
            continue
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))
