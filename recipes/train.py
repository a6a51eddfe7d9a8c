"""Train a dual encoder from a YAML recipe.

    accelerate launch recipes/train.py --config recipes/configs/tiny.yaml output_dir=outputs/tiny
    python recipes/train.py --config recipes/configs/tiny.yaml output_dir=outputs/tiny   # one process

Any config key can be overridden as ``key=value`` (or ``section.key=value``); ``--help-config`` lists
them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dualenc.errors import InputError
from dualenc.training.config import describe_config, load_config


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (recipes/configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with help text")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe_config())
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from dualenc.training.loop import train

        return train(cfg)
    except InputError as err:
        print(f"train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
    from dualenc.training.process_exit import end_process

    end_process(0)  # on several processes: without the finalization where torch's leaked gloo group aborted
