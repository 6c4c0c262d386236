"""`Obj`: a Kubernetes object as the API server serves and stores it, a plain JSON dict.

Declared once, in the lowest layer whose builders produce such objects, for the code that
reads them back from an API server (the controller's client, the Kubernetes pod source, the
activator's catalog). Past the edge where one is parsed into a model, no code passes it on.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]
