"""Sequential recommendation: SASRec trained with full, scalable (SCE) and sampled cross-entropy, the SCE
paper's setting. A sibling of training in the layer below the CLI: it uses losses, io and errors."""

from dualenc.recsys.config import SASRecConfig, describe_sasrec_config, load_sasrec_config
from dualenc.recsys.data import Interactions, SequenceSplit, read_interactions, temporal_split
from dualenc.recsys.evaluate import evaluate, ranking_metrics
from dualenc.recsys.sasrec import SASRec
from dualenc.recsys.train import load_split, train_seed

__all__ = [
    "Interactions",
    "SASRec",
    "SASRecConfig",
    "SequenceSplit",
    "describe_sasrec_config",
    "evaluate",
    "load_split",
    "load_sasrec_config",
    "ranking_metrics",
    "read_interactions",
    "temporal_split",
    "train_seed",
]
