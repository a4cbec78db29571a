"""The ``oamipc`` command's entry point: import the command line, then run it.

Importing :mod:`oamipc.cli` imports torch, onnx and onnxruntime, which takes seconds.  A Ctrl-C
in that time would otherwise end the program with a traceback (and exit status -2); here it
gets the same one line and exit status as a Ctrl-C during a command.  This module imports
nothing heavy, and the package's ``__init__`` imports nothing at all until a name is used.
"""

from __future__ import annotations

import sys

#: Exit status after a Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def main() -> None:
    """Console-script entry point."""
    try:
        from oamipc.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    run()
