"""Deprecated import path: ``minitron.evaluate`` moved to :mod:`minitron.eval.perplexity` (this re-export goes in the next release)."""
from __future__ import annotations

import warnings

from minitron.eval.perplexity import *  # noqa: F401,F403
from minitron.eval.perplexity import __all__  # noqa: F401

warnings.warn("minitron.evaluate is deprecated; import from minitron.eval.perplexity", DeprecationWarning, stacklevel=2)
