"""One record of everything that decides a feature vector: :class:`FeatureSetting`.

Three things are derived from it, and from nothing else, so they cannot disagree:

* the *cache digest* of each tap (:meth:`FeatureSetting.tap_digest`): the feature cache's key
  besides the image's content;
* the *resume fingerprint* of a job (:meth:`FeatureSetting.fingerprint`): an unfinished run
  continues only with exactly these settings, over exactly these items;
* the *provenance* stored in a feature file (:meth:`FeatureSetting.provenance`).

What does not decide vectors is listed in :data:`NOT_DECIDING`, each with its reason, and
:data:`FROM_CONFIG` says which field of the record each option of ``ExtractConfig`` decides;
tests/test_setting.py holds both lists against the code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

# Bump when a change to featx's decoding, preprocessing, pooling or batching code changes the
# vectors it computes: every cached vector and every unfinished run then belongs to the old code.
# 2: libjpeg-turbo decoding and resizing on uint8 tensors; 3: every batch padded to the batch size.
FEATURE_CODE_VERSION = 3


@dataclass(frozen=True)
class FeatureSetting:
    """Everything that decides the vectors of a feature file (of every tap in it)."""

    backbone: str  # torchvision model name
    weights_sha256: str  # of the weights file read; of the parameters made, for random weights
    taps: tuple[tuple[str, str, str], ...]  # (stored name, module, pooling), in order
    preprocessing: str  # the Preprocess record as JSON (resize, crop, mean, std, ...)
    precision: str  # the forward pass's autocast dtype: float32 | bfloat16 | float16
    dtype: str  # the stored dtype: float32 | float16
    channels_last: bool  # memory layout of the forward pass (oneDNN picks other kernels)
    device: str  # device type: cpu | cuda (other kernels, other last bits)
    torch_version: str  # another torch: other kernels
    max_pixels: int  # decides which images have a row at all
    code_version: int = FEATURE_CODE_VERSION  # featx's own decoding, pooling and batching code
    tta: str = "none"  # test-time augmentation: none | flip (the mean of an image's and its mirror's vectors)

    def _fields(self) -> dict:
        """The record as a dict; ``tta`` only when it is not ``none``, so that the digests
        and fingerprints of settings from before flip averaging stay what they were."""
        d = asdict(self)
        if d["tta"] == "none":
            del d["tta"]
        return d

    def common(self) -> dict:
        """The fields shared by every tap (all but ``taps``)."""
        return {k: v for k, v in self._fields().items() if k != "taps"}

    def tap(self, name: str) -> dict:
        """The setting of one stored tap: what decides its vectors."""
        for stored, module, pool in self.taps:
            if stored == name:
                return {**self.common(), "layer": module, "pool": pool}
        raise KeyError(name)

    def tap_digest(self, name: str) -> str:
        """The feature cache's key of a tap's setting (with the image's sha256)."""
        return _digest(self.tap(name))

    def fingerprint(self, source: dict) -> dict:
        """What an unfinished run must match to be continued: the whole setting and the
        items (``source``: :func:`featx.sources.source_fingerprint`)."""
        return {"setting": self._fields(), "source": source}

    def to_json(self) -> str:
        return json.dumps(self._fields(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSetting":
        d = json.loads(text)
        d["taps"] = tuple(tuple(t) for t in d["taps"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


# What ExtractConfig holds besides the setting, and why it does not decide vectors.
NOT_DECIDING = {
    "batch_size": "every batch is padded to it, so within a run it changes nothing; between runs of "
                  "different batch sizes oneDNN's kernels differ in the last bits (about 1e-5 relative), "
                  "which featx treats as the same vectors (docs/CACHE.md)",
    "compile": "compiled and eager vectors agree to cosine > 0.9999, and --compile auto chooses by job size",
    "workers": "decoding processes: the same pixels in any number of them",
    "on_error": "whether a failure stops the run, not which images have a row",
    "progress": "a progress bar",
    "cache": "where vectors are looked up: the file is the same with or without the cache",
}

# Which field of the setting each vector-deciding option of ExtractConfig decides.
FROM_CONFIG = {
    "backbone": "backbone",
    "weights": "weights_sha256",  # by content: a renamed or moved file is the same weights
    "seed": "weights_sha256",  # random weights: by the digest of the parameters it makes
    "layers": "taps",
    "pools": "taps",
    "small_maps": "taps",
    "image_size": "preprocessing",
    "grayscale": "preprocessing",
    "jpeg_draft": "preprocessing",
    "preprocessing": "preprocessing",
    "precision": "precision",
    "dtype": "dtype",
    "channels_last": "channels_last",
    "device": "device",
    "max_pixels": "max_pixels",
    "tta": "tta",
}
# The unit size is no option of ExtractConfig but of extract(): it decides how a job is cut
# into units (part of an unfinished run's identity, with the fingerprint), never its vectors.
