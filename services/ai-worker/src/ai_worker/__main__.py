"""Entry point: `python -m ai_worker` or the `ai-worker` console script."""

import sys


def main() -> int:
    print("ai-worker: not implemented yet (see the pipeline issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
