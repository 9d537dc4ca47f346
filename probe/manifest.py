"""Reading a ``.probe`` file without trusting it: bounded member sizes and counts, and a validated manifest.

Nothing in the zip is read before its declared size has been checked against a limit (zipfile then stops at
that size and checks the CRC), so a small archive that inflates to gigabytes is refused at once. Every manifest
field probe relies on is checked for presence and type, and a problem is a :class:`ModelFormatError` naming the
field. See docs/model-format.md. No torch import.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from .errors import ModelCompatibilityError, ProbeError
from .space import DTYPES

MANIFEST = "probe-model.json"
HEAD_FILES = ("head.skops", "head.joblib")
MAX_MEMBERS = 16
#: Largest uncompressed size accepted per member (bytes). A k-NN head over 60k x 1280 float32 features is ~300 MB.
MAX_BYTES = {MANIFEST: 16 << 20, "train-keys.txt": 512 << 20, "train-set.json": 1 << 30, "head.skops": 1 << 30,
             "head.joblib": 1 << 30}
MAX_OTHER_BYTES = 16 << 20
PRECISIONS = ("float32", "bfloat16", "float16")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ModelFormatError(ProbeError):
    """A model file is malformed: a member too large or missing, or a manifest field missing or of a wrong type."""


def read_member(z: zipfile.ZipFile, path: Path, name: str) -> bytes:
    """The bytes of member ``name`` after checking the archive's member count and the member's declared size."""
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ModelFormatError(f"{path}: {len(infos)} members in the archive (at most {MAX_MEMBERS})")
    try:
        info = z.getinfo(name)
    except KeyError:
        raise ModelFormatError(f"{path}: member {name!r} is missing") from None
    limit = MAX_BYTES.get(name, MAX_OTHER_BYTES)
    if info.file_size > limit:
        raise ModelFormatError(f"{path}: member {name!r} unpacks to {info.file_size} bytes, over the limit of "
                               f"{limit} (refusing to read it)")
    try:
        return z.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise ModelFormatError(f"{path}: member {name!r} is damaged ({e})") from e


def check_manifest(z: zipfile.ZipFile, path: Path, fmt: str, version: int) -> dict:
    """The manifest of an open model archive, every field probe uses validated."""
    raw = read_member(z, path, MANIFEST)
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: {MANIFEST} is not JSON ({e})") from e
    check = _Checker(path)
    check.type(m, "", dict)
    if m.get("format") != fmt:
        raise ProbeError(f"{path}: format {m.get('format')!r} is not {fmt!r} (not a probe model file)")
    v = check.field(m, "format_version", int)
    if v > version:
        raise ModelCompatibilityError(f"{path}: model format_version {v} is newer than this probe ({version})")
    if v < 1:
        raise ModelFormatError(f"{path}: manifest field 'format_version' is {v}, not a version")
    b = check.field(m, "backbone", dict)
    check.field(b, "name", str, "backbone.")
    check.field(b, "weights_sha256", str, "backbone.")
    check.field(b, "layer", str, "backbone.")
    check.field(b, "pooling", str, "backbone.")
    check.field(b, "weights_path", (str, type(None)), "backbone.", required=False)
    pre = check.field(b, "preprocess", dict, "backbone.")
    for key, kind in (("resize", int), ("crop", int), ("interpolation", str), ("mean", list), ("std", list)):
        check.field(pre, key, kind, "backbone.preprocess.")
    for key in ("mean", "std"):
        if len(pre[key]) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pre[key]):
            check.fail(f"backbone.preprocess.{key}", "must be 3 numbers", pre[key])
    if check.field(b, "dim", int, "backbone.") < 1:
        check.fail("backbone.dim", "must be a positive integer", b["dim"])
    if check.field(b, "dtype", str, "backbone.") not in DTYPES:
        check.fail("backbone.dtype", f"must be one of {DTYPES}", b["dtype"])
    if check.field(b, "precision", str, "backbone.") not in PRECISIONS:
        check.fail("backbone.precision", f"must be one of {PRECISIONS}", b["precision"])
    if not _HEX64.match(check.field(b, "space_digest", str, "backbone.")):
        check.fail("backbone.space_digest", "must be 64 hex digits", b["space_digest"])
    classes = check.field(m, "classes", list)
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        check.fail("classes", "must be a non-empty list of distinct strings", classes[:5])
    head_file = check.field(m, "head_file", str)
    if head_file not in HEAD_FILES:
        check.fail("head_file", f"must be one of {HEAD_FILES}", head_file)
    if head_file not in z.namelist():
        check.fail("head_file", "names no member of the archive", head_file)
    for key in ("head", "training", "metrics", "versions"):
        check.field(m, key, dict, required=False)
    for key, value in (m.get("versions") or {}).items():
        if not isinstance(value, str):
            check.fail(f"versions.{key}", "must be a string", value)
    return m


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, name: str, what: str, value) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ModelFormatError(f"{self.path}: manifest field {name!r} {what}, got {shown}")

    def type(self, value, name: str, kind) -> None:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            if name:
                self.fail(name, f"must be {names}", value)
            raise ModelFormatError(f"{self.path}: manifest is a {type(value).__name__}, not an object")

    def field(self, obj: dict, key: str, kind, prefix: str = "", required: bool = True):
        if key not in obj:
            if required:
                raise ModelFormatError(f"{self.path}: manifest field {prefix + key!r} is missing")
            return None
        self.type(obj[key], prefix + key, kind)
        return obj[key]
