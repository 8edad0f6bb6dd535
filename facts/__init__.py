"""Facts shared across layers, with no Pulumi, AWS or torch import: tags, node labels and taints, pool names,
extended-resource names, ports, Pulumi type tokens and the GPU instance-type table.

`infra/` (the deployed program), `policy/`, `ops/`, and the `training/` and `serving/` images all read these from
here, so a rename fails at import instead of in a sync test. The images copy this folder beside their own.
"""
