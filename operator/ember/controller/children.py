"""Child objects the reconcilers write: the spec-hash annotation that tells whether one is current."""

from __future__ import annotations

from typing import Any

from ember.api.common import content_digest
from ember.resources import labels

SPEC_HASH_ANNOTATION = f"{labels.PREFIX}/spec-hash"


def spec_digest(obj: Any) -> str:
    """The short content hash stored in `SPEC_HASH_ANNOTATION`."""
    return content_digest(obj)[:16]
