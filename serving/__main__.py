"""`python -m serving --model <dir|s3://...> [--port 8080] [--api-keys-file F] [--upstream URL]`.

`python -m serving serve` is the SageMaker form (the image's ENTRYPOINT is `python -m serving`).
"""

from __future__ import annotations

import sys

from serving.config import ConfigError, load_config
from serving.server import run


def main(argv: list[str] | None = None) -> int:
    """`python -m serving [serve] [flags]`: load the config, start the server; the process's exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        # SageMaker starts the container as `docker run <image> serve`: the model is in /opt/ml/model (the config
        # default when that directory exists) and the port must be 8080 (the default)
        args = args[1:]
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"serving: configuration error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
