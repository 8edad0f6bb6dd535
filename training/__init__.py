"""The bundled trainer: `python -m training` (torchrun-native), its launchers and the debug model.

See docs/training.md.
"""
