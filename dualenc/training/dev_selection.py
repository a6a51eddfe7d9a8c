"""Dev-set model selection during training: score the dev set on the main process, keep the best model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dualenc.evaluation.dev_set import DevSet
from dualenc.model.model_card import training_facts
from dualenc.training.checkpoint import TrainerState
from dualenc.training.config import RunConfig
from dualenc.training.run_log import JsonlLog

logger = logging.getLogger(__name__)


def evaluate_and_keep_best(
    accelerator, module, dev: DevSet, cfg: RunConfig, step: int, state: TrainerState, log: JsonlLog
) -> None:
    """Score the dev set on the main process; save ``best_model`` when the measure improves."""
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(module).encoder
        scores = dev.evaluate(
            encoder, cfg.train.eval_measure, batch_size=cfg.train.eval_batch_size, device=accelerator.device
        )
        value = scores[cfg.train.eval_measure]
        log.write(step, {f"dev/{k}": v for k, v in scores.items()})
        accelerator.log({f"dev/{k}": v for k, v in scores.items()}, step=step)
        logger.info("step %d: dev %s", step, json.dumps(scores))
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step = value, step
            facts = training_facts(cfg, step, accelerator.num_processes, value, step)
            encoder.save_pretrained(Path(cfg.train.output_dir) / "best_model", training=facts)
    module.train()
    accelerator.wait_for_everyone()
    best = [state.best_metric, state.best_step]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(best, from_process=0)
    state.best_metric, state.best_step = best


__all__ = ["evaluate_and_keep_best"]
