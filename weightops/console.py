"""The console entry point (`weightops` and `python -m weightops`).

Signal handling goes in before anything heavy is imported, so Ctrl-C even during
start-up is one line and exit 130, never a traceback.
"""

from weightops import signals


def main() -> None:
    signals.install()
    try:
        from weightops.cli import main as run

        signals.arm()
        run()  # exits the process itself
    except KeyboardInterrupt:
        pass
    # Only reached when stopped before a command took charge of the interrupt.
    signals.exit_stopped()
