"""Entry point: `python -m channel_whatsapp_qr` or the `channel-whatsapp-qr` console script."""

import sys


def main() -> int:
    print("channel-whatsapp-qr: not implemented yet (see the pipeline issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
