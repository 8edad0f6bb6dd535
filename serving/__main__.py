"""`python -m serving --model <dir|s3://...> [--port 8080] [--api-keys-file F] [--upstream URL]`."""

from __future__ import annotations

import sys

from serving.config import ConfigError, load_config
from serving.server import run


def main() -> int:
    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f"serving: configuration error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
