"""supmae-export command line (placeholder until its issue lands)."""

import sys


def main(argv=None) -> int:
    print("supmae-export: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
