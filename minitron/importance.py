"""Deprecated import path: ``minitron.importance`` moved to :mod:`minitron.compress.importance` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.compress.importance import *  # noqa: F401,F403
from minitron.compress.importance import __all__  # noqa: F401

warnings.warn("minitron.importance is deprecated; import from minitron.compress.importance", DeprecationWarning, stacklevel=2)
