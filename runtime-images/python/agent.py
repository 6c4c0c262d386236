"""Entry point of the Ember Python runtime agent: ``python3 -S -E agent.py``.

The agent itself is ``ember_agent.py`` beside this file, imported rather than run as a script so
that its bytecode is cached in ``__pycache__`` (the image compiles it at build time): compiling the
whole agent on every start would cost ~20 ms of the start-to-healthy budget.
"""

import ember_agent

ember_agent.main()
