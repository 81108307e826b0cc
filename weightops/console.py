"""The console entry point (`weightops` and `python -m weightops`).

Signal handling goes in before anything heavy is imported, so Ctrl-C even during
start-up is one line and exit 130, never a traceback.
"""

from __future__ import annotations

import os
import sys

from weightops import signals


def main() -> None:
    signals.install()
    try:
        from weightops.cli import main as run

        run()  # exits the process itself
    except KeyboardInterrupt:
        pass
    # Only reached when stopped before a command took charge of the interrupt.
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(signals.stop_code() or 130)
