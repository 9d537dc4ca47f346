"""Plain JSON values from what probe records (numpy scalars and arrays, tuples, estimators). Torch-free.

One definition for the model manifest, metrics.json, sweep records and head descriptions.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def plain(v):
    """numpy scalars to Python ones, so recorded values are JSON-able and compare as expected."""
    return v.item() if isinstance(v, np.generic) else v


def jsonable(v, describe: Callable[[Any], Any] | None = None):
    """``v`` as nested lists / dicts / scalars. Objects JSON cannot hold become ``describe(v)`` when given (and
    it returns something), else their ``repr``."""
    v = plain(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x, describe) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist(), describe)
    if isinstance(v, dict):
        return {str(k): jsonable(x, describe) for k, x in v.items()}
    described = describe(v) if describe is not None else None
    return described if described is not None else repr(v)


def json_default(o):
    """``json.dumps(default=...)``: numpy values as Python values, anything else as its ``str``."""
    if isinstance(o, (np.generic, np.ndarray)):
        return jsonable(o)
    return str(o)
