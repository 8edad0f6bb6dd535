"""Entry point of the Pulumi program (`main: infra/` in Pulumi.yaml)."""

import sys
from pathlib import Path

# The Pulumi language host runs this file as a script from infra/; the program is the `infra` package, so the
# repository root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi

from infra.program import build

for _key, _value in build().items():
    pulumi.export(_key, _value)
