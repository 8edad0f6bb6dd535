"""Operator tools: what a platform engineer or CI runs on a workstation, never under `pulumi up` and never in an image.

The offline preview and its mock engine (`preview`, `mocks`), the cost estimate and PR comparison (`cost`,
`compare`), teardown and the tag sweep (`teardown`, `sweep`, `automation`), artifact uploads (`artifacts`),
account-wide set-up (`account`), the config reference (`config_reference`), the training launchers
(`launch_training`, `training_k8s_job`, `training_sagemaker_job`, `stack_outputs`) and the local end-to-end run
behind `make demo` (`local_e2e`, `smollm2`, `net`). They import `infra`, `policy`, `facts`, `training` and
`serving`; nothing imports them.
"""
