"""Write docs/cli.md, the command-line reference, from the argparse parsers themselves.

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 if docs/cli.md differs from what the parsers say

tests/test_docs.py runs ``--check``, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dualenc.cli.main import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = """# Command-line reference

Generated from the parsers by `python scripts/cli_reference.py`; do not edit by hand
(`tests/test_docs.py` checks it is current). Every command also takes `--help`. Errors are one line,
`dualenc: error: ...`, with exit code 2; `--debug` (or `DUALENC_DEBUG=1`) adds the traceback. Training has its
own entry point,
`recipes/train.py` (`python recipes/train.py --help-config` lists every config key): see
[training.md](training.md).
"""


def _cell(text: str) -> str:
    escaped = text.replace("<", "&lt;").replace(">", "&gt;")  # id<TAB>text: not an HTML tag
    return escaped.replace("|", "\\|").replace("\n", " ")


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    """One markdown row per option: flags, value, default / choices, required, help."""
    rows = ["| option | value | default | required | help |", "|---|---|---|---|---|"]
    for action in parser._actions:
        if (
            isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            or action.help is argparse.SUPPRESS
        ):
            continue
        flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest}`"
        takes_value = action.nargs != 0
        value = (
            ""
            if not takes_value
            else (
                " \\| ".join(f"`{c}`" for c in action.choices)
                if action.choices
                else f"`{action.metavar or action.dest.upper()}`"
            )
        )
        default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
        required = "yes" if action.required else ""
        rows.append(f"| {flags} | {value} | {default} | {required} | {_cell(action.help or '')} |")
    return rows


def reference() -> str:
    """The markdown reference: the global options, then each subcommand's purpose and options."""
    parser = build_parser()
    parts = [HEADER, "## dualenc\n\n" + parser.description + "\n\n" + "\n".join(_option_rows(parser))]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        parts.append(f"## dualenc {name}\n\n{helps.get(name, '')}\n\n" + "\n".join(_option_rows(sub)))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="compare instead of writing")
    check = args.parse_args(argv).check
    text = reference()
    if check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
