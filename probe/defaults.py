"""Torch-free names shared by the library and the CLI, so `probe --help` and `probe cache ...` start without
importing torch."""

DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_CACHE = "cache"
PENULTIMATE = "penultimate"  # the default feature: the classifier's input
RUNTIMES = ("auto", "eager", "onnxruntime", "openvino")  # what runs the backbone (probe/runtime.py)
POOLINGS = ("avg", "max", "cls", "flatten", "none")  # reductions of a --layer output
DEFAULT_MAX_PIXELS = 89_478_485  # refuse larger images (decompression-bomb guard); Pillow's own default
