"""The training image's package: `python -m training` (the trainer, torchrun-native), `training.torchrun` (torchrun
that exits 143 when stopped), the SageMaker entry point, evaluation and the debug model. It is exactly what
containers/training.Dockerfile copies (with `facts/`); the launchers that start it on a stack are in ops/.

See docs/training.md.
"""
