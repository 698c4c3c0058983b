"""Deprecated import path: ``minitron.tokenizer`` moved to :mod:`minitron.io.tokenizer` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.io.tokenizer import *  # noqa: F401,F403
from minitron.io.tokenizer import __all__  # noqa: F401

warnings.warn("minitron.tokenizer is deprecated; import from minitron.io.tokenizer", DeprecationWarning, stacklevel=2)
