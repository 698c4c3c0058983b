"""Deprecated import path: ``minitron.prune`` moved to :mod:`minitron.compress.prune` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.compress.prune import *  # noqa: F401,F403
from minitron.compress.prune import __all__  # noqa: F401

warnings.warn("minitron.prune is deprecated; import from minitron.compress.prune", DeprecationWarning, stacklevel=2)
