"""The dual encoder: towers (the Encoder protocol, HFEncoder), DualEncoder with its config, its model
directory. The layer above dualenc.io, beside dualenc.losses: it imports only dualenc.io and
dualenc.errors."""

from dualenc.model.config import DualEncoderConfig
from dualenc.model.encoder import DualEncoder, tokenize_texts
from dualenc.model.model_dir import resolve_model_path
from dualenc.model.options import POOLINGS
from dualenc.model.towers import Encoder, HFEncoder, pool

__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "Encoder",
    "HFEncoder",
    "POOLINGS",
    "pool",
    "resolve_model_path",
    "tokenize_texts",
]
