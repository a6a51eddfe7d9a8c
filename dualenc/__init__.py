"""dualenc: train and evaluate dense passage retrievers (dual encoders).

The library is seven layers of packages, each importing only the layers below it (docs/architecture.md):
``cli``; ``training`` and ``recsys``; ``evaluation`` and ``negcache``; ``retrieval``; ``model`` and
``losses``; ``io``; ``errors``. Import from the packages, e.g. ``from dualenc.training import train,
load_config``; ``import dualenc`` itself loads nothing but the error type.
"""

from __future__ import annotations

from dualenc.errors import InputError

__version__ = "0.1.0"

__all__ = ["InputError", "__version__"]
