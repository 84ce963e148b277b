"""``python -m lorabench`` and the ``lorabench`` command: the CLI, with Ctrl-C during its imports (torch takes
seconds) a one-line stop like any other (exit 130)."""
import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("lorabench: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
