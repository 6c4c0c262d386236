"""`ember` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("ember: not yet", file=sys.stderr)
    return 2
