"""Entry point of the operator: `python -m ember.operator_main` (settings from EMBER_* variables)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any, cast

import kopf

from ember.controller.handlers import register
from ember.controller.settings import SettingsError, from_env


def main() -> int:
    """Parse settings, register handlers, run kopf until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=os.environ.get("EMBER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    try:
        config = from_env(os.environ)
    except SettingsError as err:
        print(f"ember operator: {err}", file=sys.stderr)
        return 2
    registry = kopf.OperatorRegistry()
    register(registry, config)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            # kopf's default identity asks the passwd database, which may not know the pod's uid.
            identity=cast(Any, os.environ.get("POD_NAME") or socket.gethostname()),
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            liveness_endpoint=os.environ.get("EMBER_LIVENESS_ENDPOINT") or None,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
