"""epicfeat: EPIC-KITCHENS-100 action recognition as a two-stage feature-cache pipeline.

Stage one (``epicfeat.extract``) streams videos through ResNet50 into Zarr feature stores; stage two
(``epicfeat.temporal``) trains a BiLSTM on cached feature sequences in minutes.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("epicfeat")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
