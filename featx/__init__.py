"""featx: transfer learning by feature extraction.

Frozen torchvision backbones write pooled features to a self-describing HDF5 file
(:mod:`featx.extract`, :mod:`featx.store`); scikit-learn classifiers are fitted on them
(:mod:`featx.fit`) and saved with their provenance (:mod:`featx.bundle`).  The layers and
where each kind of change goes: docs/ARCHITECTURE.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featx")  # the one copy of the version lives in pyproject.toml
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "unknown"

__all__ = ["__version__", "ExtractConfig", "extract", "FeatureStore", "open_source"]


def __getattr__(name):  # keep `import featx` light: torch loads only when needed
    if name in ("ExtractConfig", "extract"):
        from featx import extract as _e

        return getattr(_e, name)
    if name == "FeatureStore":
        from featx.store import FeatureStore

        return FeatureStore
    if name == "open_source":
        from featx.sources import open_source

        return open_source
    raise AttributeError(name)
