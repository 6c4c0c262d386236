"""Entry point of the Ember Python runtime agent: ``python3 -S -E agent.py``.

The agent is the ``ember_agent`` package beside this file (in an image: its one-file build
``ember_agent.py``, see ``bundle.py``), imported rather than run as a script so that its bytecode
is cached in ``__pycache__`` (the image compiles it at build time): compiling the whole agent on
every start would cost ~20 ms of the start-to-healthy budget.
"""

import ember_agent

ember_agent.main()
