"""The policy pack the Pulumi CLI runs: `pulumi preview --policy-pack policy` (from the repository root).

Constructing `PolicyPack` starts the analyzer's gRPC server and blocks: nothing else may import this module.
"""

import sys
from pathlib import Path

# The CLI runs this file from policy/; the rules import the repository's `policy` and `infra` packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import EnforcementLevel, PolicyPack

from policy.pack import PACK_NAME, policies

PolicyPack(name=PACK_NAME, enforcement_level=EnforcementLevel.MANDATORY, policies=policies())
