"""Deprecated import path: ``minitron.plotting`` moved to :mod:`minitron.io.plotting` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.io.plotting import *  # noqa: F401,F403
from minitron.io.plotting import __all__  # noqa: F401

warnings.warn("minitron.plotting is deprecated; import from minitron.io.plotting", DeprecationWarning, stacklevel=2)
