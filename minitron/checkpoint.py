"""Deprecated import path: ``minitron.checkpoint`` moved to :mod:`minitron.io.checkpoint` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.io.checkpoint import *  # noqa: F401,F403
from minitron.io.checkpoint import __all__  # noqa: F401

warnings.warn("minitron.checkpoint is deprecated; import from minitron.io.checkpoint", DeprecationWarning, stacklevel=2)

from minitron.io.safety import same_or_inside  # noqa: E402,F401  (old home of this helper)
