"""memproxy: give every AI client its own memory space in front of LiteLLM.

Detector plugins import everything they need from here::

    from memproxy import hookimpl, DetectorSpec, DetectorContext, Detection
"""

from __future__ import annotations

import pluggy

from memproxy.config import ConfigError
from memproxy.hookspecs import (
    ClientRequest,
    DetectFunction,
    Detection,
    DetectorContext,
    DetectorOption,
    DetectorSpec,
    InvalidUserId,
    RequestDetectFunction,
)

__version__ = "0.1.0"

#: Marker for detector plugins: decorate ``memproxy_detectors`` with it.
hookimpl = pluggy.HookimplMarker("memproxy")

__all__ = [
    "ClientRequest",
    "ConfigError",
    "DetectFunction",
    "Detection",
    "DetectorContext",
    "DetectorOption",
    "DetectorSpec",
    "InvalidUserId",
    "RequestDetectFunction",
    "__version__",
    "hookimpl",
]
