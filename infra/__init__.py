"""The Pulumi program `pulumi up` executes (`Pulumi.yaml` -> `infra/__main__.py` -> `infra.program.build`), and only
that: the stack configuration (`config`), one component per concern, the pinned charts they install, the
preview-time checks (`preflight`) and the outputs contract (`outputs`). It imports `facts` and nothing else of ours;
the operator tools that drive it offline (preview, mock engine, cost, teardown) live in `ops/`.
"""
