"""dualenc: train and evaluate dense passage retrievers (dual encoders).

The public API is imported lazily so that ``import dualenc`` stays cheap and has no side effects.
"""

from __future__ import annotations

from dualenc.errors import InputError

__version__ = "0.1.0"

__all__ = ["InputError", "__version__"]
