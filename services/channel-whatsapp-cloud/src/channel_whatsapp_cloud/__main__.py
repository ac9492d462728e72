"""Entry point: `python -m channel_whatsapp_cloud` or the `channel-whatsapp-cloud` script."""

import sys


def main() -> int:
    print("channel-whatsapp-cloud: not implemented yet (see the pipeline issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
