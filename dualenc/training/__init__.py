"""Two-tower training on HF Accelerate: config, training data and batches, the step plan, one micro-batch's
loss, the loop and its checkpoints. It sits above every layer but the CLI."""

from dualenc.training.build import build_loss, build_model, make_accelerator
from dualenc.training.config import RunConfig, describe_config, load_config, save_config
from dualenc.training.data import TrainData, load_train_data
from dualenc.training.loop import TrainResult, train

__all__ = [
    "RunConfig",
    "TrainData",
    "TrainResult",
    "build_loss",
    "build_model",
    "describe_config",
    "load_config",
    "load_train_data",
    "make_accelerator",
    "save_config",
    "train",
]
