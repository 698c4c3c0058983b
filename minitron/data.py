"""Deprecated import path: ``minitron.data`` moved to :mod:`minitron.io.data` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.io.data import *  # noqa: F401,F403
from minitron.io.data import __all__  # noqa: F401

warnings.warn("minitron.data is deprecated; import from minitron.io.data", DeprecationWarning, stacklevel=2)
