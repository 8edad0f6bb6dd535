"""Container HEALTHCHECK: exit 0 when this container's server answers /readyz with 200 (stdlib only, fast)."""

from __future__ import annotations

import os
import sys
import urllib.request

from facts.cluster import SERVING_PORT


def main() -> int:
    """The image's `HEALTHCHECK`: exit 0 when `/readyz` on this container's port answers 200."""
    port = os.environ.get("SERVING_PORT", str(SERVING_PORT))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
