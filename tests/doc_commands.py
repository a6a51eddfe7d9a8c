"""Fenced blocks of the markdown pages and static checks of the commands in them (tests/test_doc_blocks.py).

:func:`read_blocks` splits a page into :class:`Block` s, :func:`commands_of` finds a block's commands (every
line of a ```bash block; the ``$ `` lines of another block, each followed by its shown output), and
:func:`shell_words` cuts a command into simple commands (``&&``, ``;``, ``|``, ``$(...)``, env prefixes,
``for``/``do``/``done``; a comment ``# label: COMMAND`` holding a dualenc, python or launcher command counts
too). :class:`Checker` checks one simple command against the real parsers: dualenc's argparse parsers, each
script's own parser (captured in a child process), Accelerate's and torchrun's launch parsers, and the
training and SASRec config loaders for ``--config FILE key=value``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```\s*([\w+-]*)[^`]*$")  # ```lang, any attributes after it
MARK = re.compile(r"^<!-- not run: (.*) -->\s*$")
REASONS = (
    "needs the full MS MARCO collection",
    "needs a GPU",
    "needs several machines",
    r"takes \d+ (?:minutes?|hours?)",
    "synopsis",
)
FILE_MARK = re.compile(r"# ([\w.-]+\.py)\n")
ASSIGN = re.compile(r"[A-Za-z_]\w*=")
PLACEHOLDER = re.compile(r"\.\.\.|…|.*\$.*|[A-Z][A-Z0-9_]*|.*<.*>.*|\[.*|.*\]")
CHECKED = ("dualenc", "python", "python3", "accelerate", "torchrun", "bash", "sh")
ALLOWED = frozenset(
    "pip cd ls cat head grep mkdir rm cp export echo git mkdocs lint-imports wget tar ir_datasets".split()
)
PYTHON_MODULES = frozenset({"pip", "pytest", "mkdocs"})
DUALENC_MODULES = ("dualenc", "dualenc.cli")
SCRIPT_DIRS = ("eval", "bench", "recipes", "scripts")
SEPARATORS = frozenset({";", "&&", "||", "|", "&", ";;"})
REDIRECTS = frozenset({">", ">>", "<", ">&", "&>", "<<"})
COMMENT_COMMAND = re.compile(rf"^(?:[\w ,/-]+:\s+)?((?:{'|'.join(CHECKED)})\s.*?)(?:\s{{2,}}.*)?$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence, its tag ("" untagged), text and mark."""

    page: str
    line: int
    lang: str
    text: str
    mark: str | None  # REASON of a ``<!-- not run: REASON -->`` line right before the fence

    @property
    def id(self) -> str:
        return f"{Path(self.page).name}:{self.line}"


@dataclass(frozen=True)
class Command:
    """One command line (continuations joined, prompt removed), its page line and the output shown after."""

    line: int
    text: str
    output: str = ""


def read_blocks(text: str, page: str) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks and its problems: a mark not right before a fence, an unclosed fence."""
    lines, blocks, problems = text.splitlines(), [], []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if MARK.match(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f"{page}:{i + 1}: a not-run mark must be the line right before a fence")
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            return blocks, [*problems, f"{page}:{i + 1}: this fence is never closed"]
        mark = MARK.match(lines[i - 1]) if i else None
        body = "".join(line + "\n" for line in lines[i + 1 : end])
        blocks.append(Block(page, i + 1, opening.group(1), body, mark.group(1) if mark else None))
        i = end + 1
    return blocks, problems


def reason_is_known(reason: str) -> bool:
    return any(re.fullmatch(r, reason) for r in REASONS)


def block_kind(block: Block) -> str:
    """python | bash | prompt (``$ `` lines) | bare (untagged, no prompt) | yaml | json | output"""
    if block.lang in ("python", "bash", "yaml", "json"):
        return block.lang
    if block.lang in ("sh", "shell"):
        return "bash"
    if any(line.startswith("$ ") for line in block.text.splitlines()):
        return "prompt"
    first = block.text.split(maxsplit=1)[:1]
    return "bare" if block.lang == "" and first and first[0] in CHECKED else "output"


def commands_of(block: Block) -> list[Command]:
    kind = block_kind(block)
    if kind in ("bash", "bare"):
        return _joined(block.text.splitlines(), block.line + 1)
    return _prompted(block.text.splitlines(), block.line + 1) if kind == "prompt" else []


def _joined(lines: list[str], first: int) -> list[Command]:
    """One command per logical line: a line ending in a backslash continues on the next, and so does a line
    that leaves a quote open (``python -c '...'`` over several lines keeps its newlines and indentation)."""
    commands, i = [], 0
    while i < len(lines):
        start, parts = i, [lines[i]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            parts[-1] = parts[-1].rstrip()[:-1]
            i += 1
            parts.append(lines[i])
        text = " ".join(p.strip() for p in parts)
        while _quote_open(text) and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
        if text:  # a comment line too: it may hold a command (see shell_words)
            commands.append(Command(first + start, text))
        i += 1
    return commands


def _quote_open(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return True
    return False


def _prompted(lines: list[str], first: int) -> list[Command]:
    """Each ``$ `` line (and its continuations) is a command; the lines up to the next one are its output."""
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    commands = []
    for n, start in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = [lines[start][2:], *lines[start + 1 : stop]]
        end = next((k for k, line in enumerate(body) if not line.rstrip().endswith("\\")), len(body) - 1)
        text = " ".join(p.strip().removesuffix("\\").strip() for p in body[: end + 1])
        output = "\n".join(body[end + 1 :]).strip("\n")
        commands.append(Command(first + start, text, output + "\n" if output else ""))
    return commands


def _split_comment(line: str) -> tuple[str, str]:
    """``(code, comment)``: a ``#`` outside quotes, at the start or after whitespace, starts the comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :].strip()
    return line, ""


def shell_words(text: str) -> list[list[str]]:
    """The simple commands of a command line as word lists (env prefixes kept), a comment's command too."""
    code, comment = _split_comment(text)
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    commands = _simple_commands(list(lexer))
    quoted = COMMENT_COMMAND.match(comment)
    return commands + (shell_words(quoted.group(1)) if quoted else [])


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    commands, current, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "(":  # $(...) or a subshell: its commands count, the word keeps a placeholder
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            commands += _simple_commands(tokens[i + 1 : j - 1])
            if current and current[-1].endswith("$"):
                current[-1] += "(...)"
            i = j
            continue
        if token in SEPARATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            if current and current[-1].isdigit():
                current.pop()  # 2> file: the descriptor
            i += 1  # and the target
        else:
            current.append(token)
        i += 1
    return [words for words in map(_without_keywords, [*commands, current]) if words]


def _without_keywords(words: list[str]) -> list[str]:
    while words and words[0] in ("do", "then", "else", "while", "until", "if", "elif", "!", "time"):
        words = words[1:]
    return [] if words and words[0] in ("for", "done", "fi", "esac", "case", "{", "}") else words


def is_flag(word: str) -> bool:
    return word.startswith("-") and len(word) > 1 and not re.match(r"-\d", word)


@dataclass(frozen=True)
class Options:
    """What a parser accepts: each option string with its nargs (0, 1, n, ?, *, +), and whether it takes
    ``key=value`` overrides (a positional named ``overrides``)."""

    flags: dict[str, int | str]
    overrides: bool = False

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> Options:
        flags = {s: 1 if a.nargs is None else a.nargs for s, a in parser._option_string_actions.items()}
        return cls(flags, any(a.dest == "overrides" for a in parser._actions if not a.option_strings))


def walk(args: list[str], options: Options, where: str, stop: bool = False) -> tuple[list[str], dict, list]:
    """Check each flag of ``args``; returns (problems, {flag: values}, positionals). With ``stop``, the first
    positional ends the walk: it and everything after it are returned as the positionals."""
    problems, values, positionals, i = [], {}, [], 0
    while i < len(args):
        word, i = args[i], i + 1
        if not is_flag(word):
            if stop:
                return problems, values, args[i - 1 :]
            positionals.append(word)
            continue
        name, eq, value = word.partition("=")
        if name not in options.flags:
            close = difflib.get_close_matches(name, list(options.flags), n=1)
            problems.append(
                f"{where}: unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else "")
            )
            continue
        nargs, taken = options.flags[name], [value] if eq else []
        while not eq and i < len(args) and _wants_more(nargs, len(taken)) and not is_flag(args[i]):
            taken.append(args[i])
            i += 1
        values.setdefault(name, []).extend(taken)
    return problems, values, positionals


def _wants_more(nargs: int | str, taken: int) -> bool:
    return (
        nargs in ("*", "+", "...")
        or (nargs == "?" and taken == 0)
        or (isinstance(nargs, int) and taken < nargs)
    )


def placeholder(word: str) -> bool:
    """``...``, ``$VAR``, ``MODEL_DIR``, ``<loss>``, ``[more runs...]``: stands for a value, not one."""
    return bool(PLACEHOLDER.fullmatch(word))


class Checker:
    """Checks one simple command (a word list) against the parsers and config schemas it names.

    ``scripts(path)`` gives a script's :class:`Options`, or a line saying why there are none.
    """

    def __init__(self, scripts: Callable[[str], Options | str]) -> None:
        from accelerate.commands.launch import launch_command_parser
        from torch.distributed.run import get_args_parser

        from dualenc.cli.main import build_parser

        parser = build_parser()
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        self.dualenc = Options.of(parser)
        self.subcommands = {name: Options.of(p) for name, p in sub.choices.items()}
        self.launchers = {
            "accelerate launch": Options.of(launch_command_parser()),
            "torchrun": Options.of(get_args_parser()),
        }
        self.scripts = scripts

    def check(self, words: list[str], local: frozenset[str] = frozenset()) -> list[str]:
        """Problems of one command; ``local`` names the files the page itself writes (``python my.py``)."""
        while words and ASSIGN.match(words[0]):
            words = words[1:]
        if not words or placeholder(words[0]):
            return []
        program, args = words[0], words[1:]
        if program == "dualenc":
            return self.check_dualenc(args)
        if program in ("python", "python3"):
            return self.check_python(args, local)
        if program == "accelerate":
            if args[:1] != ["launch"]:
                return (
                    [] if args[:1] in (["config"], ["env"]) else [f"accelerate: unknown command {args[:1]}"]
                )
            return self.check_launch("accelerate launch", args[1:], local)
        if program == "torchrun":
            return self.check_launch("torchrun", args, local)
        if program in ("bash", "sh"):
            return self.check_bash(args)
        if program in ALLOWED:
            return []
        return [f"unknown program {program!r}: check it in tests/doc_commands.py or add it to ALLOWED"]

    def check_dualenc(self, args: list[str]) -> list[str]:
        problems, values, rest = walk(args, self.dualenc, "dualenc", stop=True)
        if not rest:
            return problems + ([] if values.keys() & {"-h", "--help"} else ["dualenc: no command"])
        if placeholder(rest[0]):
            return problems
        if rest[0] not in self.subcommands:
            return [*problems, f"dualenc: unknown command {rest[0]!r}"]
        return problems + walk(rest[1:], self.subcommands[rest[0]], f"dualenc {rest[0]}")[0]

    def check_python(self, args: list[str], local: frozenset[str]) -> list[str]:
        while args and args[0] in ("-u", "-B", "-O", "-E", "-s"):
            args = args[1:]
        if not args or (args[0] in ("-m", "-c") and len(args) < 2):
            return ["python: no script, module or code"]
        if args[0] == "-m":
            return self.check_module(args[1], args[2:], local)
        if args[0] == "-c":
            return python_problems(args[1], "python -c")
        return self.check_script(args[0], args[1:], local)

    def check_module(self, module: str, args: list[str], local: frozenset[str]) -> list[str]:
        if module in DUALENC_MODULES:
            return self.check_dualenc(args)
        if module == "torch.distributed.run":
            return self.check_launch("torchrun", args, local)
        return [] if module in PYTHON_MODULES else [f"python -m {module}: a module this check does not know"]

    def check_launch(self, launcher: str, args: list[str], local: frozenset[str]) -> list[str]:
        problems, values, rest = walk(args, self.launchers[launcher], launcher, stop=True)
        if not rest or placeholder(rest[0]):
            return problems
        if values.keys() & {"-m", "--module"}:
            return problems + self.check_module(rest[0], rest[1:], local)
        return problems + self.check_script(rest[0], rest[1:], local)

    def check_script(self, path: str, args: list[str], local: frozenset[str]) -> list[str]:
        if path in local or placeholder(path):
            return []
        if path.split("/")[0] not in SCRIPT_DIRS or not (REPO / path).is_file():
            return [f"{path}: no such script in {', '.join(d + '/' for d in SCRIPT_DIRS)}"]
        options = self.scripts(path)
        if isinstance(options, str):
            return [f"{path}: {options}"]
        overrides = [a for a in args if options.overrides and "=" in a and not is_flag(a)]
        problems, values, _ = walk([a for a in args if a not in overrides], options, path)
        if path in CONFIG_SCRIPTS and not values.keys() & {"-h", "--help", "--help-config", "--combine"}:
            problems += config_problems(path, (values.get("--config") or [None])[-1], overrides)
        return problems

    def check_bash(self, args: list[str]) -> list[str]:
        if args[:1] == ["-c"] and len(args) > 1:
            return [p for line in args[1].splitlines() for w in shell_words(line) for p in self.check(w)]
        script = next((a for a in args if not is_flag(a)), None)
        if script is None or placeholder(script):
            return [] if script else ["bash: no script"]
        if script.split("/")[0] not in ("recipes", "scripts") or not (REPO / script).is_file():
            return [f"{script}: no such script in recipes/ or scripts/"]
        return []


def python_problems(code: str, where: str) -> list[str]:
    """Syntax, and every ``from dualenc... import name`` resolving to something that exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        return [f"{where}: {err.msg} (line {err.lineno})"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dualenc":
            module = importlib.import_module(node.module)
            problems += [
                f"{where}: {node.module} has no {a.name!r}"
                for a in node.names
                if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None
            ]
    return problems


def _training_keys() -> set[str]:
    from dualenc.training.config import SECTIONS

    return {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)} | {
        f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
    }


def _sasrec_keys() -> set[str]:
    from dualenc.recsys.config import SASRecConfig

    return {f.name for f in dataclasses.fields(SASRecConfig)}


def _load_training(path: Path | None, overrides: list[str]) -> None:
    from dualenc.training.config import load_config

    load_config(path, overrides)


def _load_sasrec(path: Path | None, overrides: list[str]) -> None:
    from dualenc.recsys.config import load_sasrec_config

    load_sasrec_config(path, overrides)


CONFIG_SCRIPTS = {
    "recipes/train.py": (_training_keys, _load_training),
    "recipes/sasrec.py": (_sasrec_keys, _load_sasrec),
}


def config_problems(script: str, config: str | None, overrides: list[str]) -> list[str]:
    """The config file exists and loads with the overrides; an override whose value is a placeholder
    (``output_dir=$R``) is checked by its key only."""
    from dualenc.errors import InputError

    keys, load = CONFIG_SCRIPTS[script]
    vague = [o for o in overrides if placeholder(o.partition("=")[2])]
    problems = [
        f"{script}: unknown config key {o.partition('=')[0]!r}"
        for o in vague
        if o.partition("=")[0] not in keys()
    ]
    if config is not None and placeholder(config):
        return problems
    if config is not None and not (REPO / config).is_file():
        return [*problems, f"{script}: no config file {config}"]
    try:
        load(REPO / config if config else None, [o for o in overrides if o not in vague])
    except InputError as err:
        problems.append(f"{script}: {err}")
    return problems


def training_yaml_problems(text: str, where: str) -> list[str]:
    """A YAML block with training-config sections or keys (a snippet, not always a whole config): every key
    is a config key and every value has its key's type."""
    import yaml

    from dualenc.errors import InputError
    from dualenc.io.config_file import coerce
    from dualenc.training.config import SECTIONS

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not set(data) & (set(SECTIONS) | _training_keys()):
        return []
    sections = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    items = [
        (name, key, value)
        for name, values in data.items()
        for key, value in (
            values.items() if name in SECTIONS and isinstance(values, dict) else [(name, values)]
        )
    ]
    problems = []
    for name, key, value in items:
        section = sections.get(key)
        if section is None or (name != key and name != section):
            problems.append(
                f"{where}: unknown config key {key!r}" + (f" in section {name!r}" if name != key else "")
            )
            continue
        try:
            coerce(value, typing.get_type_hints(SECTIONS[section])[key], f"{section}.{key}")
        except InputError as err:
            problems.append(f"{where}: {err}")
    return problems


def script_paths(text: str) -> set[str]:
    """Every ``eval/``, ``bench/``, ``recipes/``, ``scripts/`` Python script a text names."""
    return set(re.findall(rf"(?<![\w/])((?:{'|'.join(SCRIPT_DIRS)})/\w+\.py)\b", text))


def probe_scripts(paths: list[str]) -> dict[str, Options | str]:
    """Each script's :class:`Options`, captured in one child process (its module runs there, not here)."""
    code = "import sys, doc_commands; doc_commands._probe_main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with tempfile.TemporaryDirectory() as cwd:  # a script that wrote anything would write there
        command = [sys.executable, "-c", code, *paths]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("DOC_PROBE ")), None)
    if line is None:
        return {p: f"probing its parser failed:\n{done.stderr[-2000:]}" for p in paths}
    found = json.loads(line.removeprefix("DOC_PROBE "))
    return {p: Options(v["flags"], v["overrides"]) if isinstance(v, dict) else v for p, v in found.items()}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _capture(self: argparse.ArgumentParser, args=None, namespace=None):
    raise _Captured(self)


def _parser_of(path: str) -> argparse.ArgumentParser | str:
    """Run ``main(["--help"])`` of the script until its parser parses: that parser, caught instead."""
    sys.path.insert(0, str((REPO / path).parent))
    saved = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = _capture
    try:
        main = runpy.run_path(str(REPO / path), run_name="doc_probe").get("main")
        if main is None:
            return "no main(argv) to find its parser in"
        main(["--help"])
        return "main(argv) returned without parsing its arguments"
    except _Captured as caught:
        return caught.parser
    except Exception as err:  # noqa: BLE001 - reported as the script's problem
        return f"main(['--help']) raised {err!r} before parsing its arguments"
    finally:
        argparse.ArgumentParser.parse_known_args = saved
        sys.path.pop(0)


def _probe_main(paths: list[str]) -> None:
    found = {}
    for path in paths:
        parser = _parser_of(path)
        found[path] = parser if isinstance(parser, str) else dataclasses.asdict(Options.of(parser))
    print("DOC_PROBE " + json.dumps(found))
