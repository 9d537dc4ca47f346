"""probe: frozen-backbone feature extraction into a content-addressed HDF5 cache, and linear probes on top.

The public API is re-exported here and imported lazily, so ``import probe.cache`` or ``probe.heads`` (training a
head on cached features) never pays for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "extract": "probe.engine",
    "Extractor": "probe.engine",
    "ExtractOptions": "probe.options",
    "FeatureSet": "probe.featureset",
    "FeatureCache": "probe.cache",
    "FeatureSpace": "probe.space",
    "Preprocess": "probe.preprocess",
    "load_backbone": "probe.backbones",
    "backbone_names": "probe.backbones",
    "resolve": "probe.sources",
    "Record": "probe.sources",
    "fit": "probe.training",
    "evaluate": "probe.training",
    "load": "probe.model",
    "ProbeModel": "probe.model",
    "predict": "probe.prediction",
    "FeatureExtractor": "probe.sklearn",
    "RayExtractor": "probe.distributed",
    "extract_ray": "probe.distributed",
    "predict_ray": "probe.batch_scoring",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
