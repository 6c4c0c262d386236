"""Fixtures of the activator's local tier (see helpers.py): a real activator over real agent processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import Activator, run_activator


@pytest.fixture
async def activator() -> AsyncIterator[Activator]:
    async with run_activator() as running:
        yield running
