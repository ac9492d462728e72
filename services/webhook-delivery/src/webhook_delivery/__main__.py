"""Entry point: `python -m webhook_delivery` or the `webhook-delivery` console script."""

import sys


def main() -> int:
    print("webhook-delivery: not implemented yet (see the pipeline issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
