"""Entry point: `python -m gateway` or the `gateway` console script."""

import sys


def main() -> int:
    print("gateway: not implemented yet (see the pipeline issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
