"""The documentation stays true to the code: docs/flags.md is what tools/make_flags_doc.py writes,
every relative link and #anchor of README.md and docs/*.md leads somewhere, and every command their
```bash blocks show for main.py, demo.py, tools/*.py and the launchers parses with that script's own
argparse parser (flags that exist, values it accepts). Nothing is run or trained: a few seconds."""
import argparse
import importlib
import inspect
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple
from unittest import mock
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS_DOC = ROOT / "docs" / "flags.md"
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# Commands: most of those shown must be checked, not skipped as placeholders. The pages show 28
# commands of main.py, demo.py, tools/ and the launchers (some on two pages), 2 with placeholders.
MIN_CHECKED_COMMANDS = 20
MAX_SKIPPED_SHARE = 0.25
PYTHON_LAUNCHERS = {"python", "python3", "torchrun"}  # ... or any path ending in /python, /python3
TORCH_RUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")  # python -m M [opts] main.py
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTION_TO_FILE = re.compile(r"^(\d*>>?|<|&>)$")  # the next word is its file
REDIRECTION_WORD = re.compile(r"^(\d*>>?|&>)\S+$")  # 2>&1, >log.txt (not <name>: a placeholder)
PLACEHOLDER = re.compile(r"\.\.\.|<[^<>]*>|\$")  # ..., <name>, $VAR: not parseable as written
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LAUNCHER_SCRIPT = re.compile(r"^(scripts|scripts_slurm)/[\w.-]+\.sh$")
TOOL_SCRIPT = re.compile(r"^tools/(\w+)\.py$")
# the functions of a tool that build (and maybe parse) its command line, in order of preference
PARSER_BUILDERS = ("build_parser", "get_parser")
PARSER_ENTRIES = ("parse_args", "main")

# Markdown
FENCE = re.compile(r"^\s*(```|~~~)")
BASH_FENCE = re.compile(r"^\s*```\s*(bash|sh|shell|console)\s*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\n\s*\n)[\s\S])*?(?<!`)\1(?!`)")  # within a paragraph
INLINE_LINK = re.compile(r"\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[(?!\^)[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
HEADING_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")
NOT_IN_SLUG = re.compile(r"[^\w\- ]")  # GitHub keeps letters, digits, _, - and spaces (then hyphens)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------------------------
# Markdown reading
# --------------------------------------------------------------------------------------------
def without_code_blocks(text: str) -> str:
    """The text with the lines of fenced code blocks emptied (line numbers kept)."""
    lines, in_fence = [], False
    for line in text.split("\n"):
        fence = FENCE.match(line)
        lines.append("" if in_fence or fence else line)
        if fence:
            in_fence = not in_fence
    return "\n".join(lines)


def prose(text: str) -> str:
    """The text without code: code blocks emptied and inline code blanked out (newlines kept, so
    that offsets and line numbers still point into the original)."""
    return INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), without_code_blocks(text))


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (link text, no tags), lower-cased, without
    punctuation (backticks, parentheses, dots, slashes ...), spaces as hyphens."""
    text = HTML_TAG.sub("", HEADING_LINK.sub(r"\1", heading))
    return NOT_IN_SLUG.sub("", text.strip().lower()).replace(" ", "-")


def headings(text: str) -> List[str]:
    """The heading texts of a page, in order (ATX `#` and setext underlined ones), outside code."""
    found, previous = [], ""
    for line in without_code_blocks(text).split("\n"):
        atx = ATX_HEADING.match(line)
        if atx:
            found.append(atx.group(2))
        elif SETEXT_UNDERLINE.match(line) and previous.strip() and not ATX_HEADING.match(previous):
            found.append(previous.strip())
        previous = line
    return found


def anchors(text: str) -> Set[str]:
    """Every #anchor a page has: heading slugs, duplicates numbered -1, -2, ... as GitHub does, and
    explicit <a name=...> / <a id=...>."""
    seen: Dict[str, int] = {}
    result = set(HTML_ANCHOR.findall(prose(text)))
    for heading in headings(text):
        base = candidate = slug(heading)
        while candidate in seen:
            seen[base] += 1
            candidate = f"{base}-{seen[base]}"
        seen[candidate] = 0
        result.add(candidate)
    return result


def links(text: str) -> Iterator[Tuple[int, str]]:
    """(line, target) of every link and image outside code: inline, reference definitions, HTML."""
    visible = prose(text)
    for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK):
        for match in pattern.finditer(visible):
            yield line_of(visible, match.start(1)), match.group(1)


def link_problem(page: Path, target: str, anchors_of: Callable[[Path], Set[str]]) -> Optional[str]:
    """What is wrong with one relative link of `page`, or None (external links are not checked)."""
    if not target or URL_SCHEME.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.partition("?")[0])
    if path_part.startswith("/"):
        resolved = ROOT / path_part.lstrip("/")  # GitHub reads /x as the repository's root
    else:
        resolved = (page.parent / path_part) if path_part else page
    if not resolved.exists():
        return f"{target}: no such file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}"
    if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors_of(resolved.resolve()):
        return f"{target}: no heading with anchor #{anchor} in {rel(resolved.resolve())}"
    return None


def link_problems(page: Path, text: str) -> List[str]:
    """'file:line: problem' for every broken relative link or anchor of one page (its text given,
    so that another version of a page can be checked against the current tree)."""
    cache: Dict[Path, Set[str]] = {page.resolve(): anchors(text)}

    def anchors_of(path: Path) -> Set[str]:
        if path not in cache:
            cache[path] = anchors(path.read_text())
        return cache[path]

    return [f"{rel(page)}:{line}: {problem}" for line, target in links(text)
            if (problem := link_problem(page, target, anchors_of))]


# --------------------------------------------------------------------------------------------
# Commands in ```bash blocks
# --------------------------------------------------------------------------------------------
class Command(NamedTuple):
    where: str  # file:line
    argv: List[str]  # the words after environment assignments, as the shell splits them


def bash_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(first line, logical line) of every ```bash block line, backslash continuations joined."""
    in_bash = in_fence = False
    pending, start = "", 0
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            if pending:  # a block's last line ended with a backslash
                yield start, pending
                pending = ""
            in_bash, in_fence = (not in_fence and bool(BASH_FENCE.match(line))), not in_fence
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def shell_words(logical: str) -> List[str]:
    """The words of a line as the shell splits them, comments dropped, `x;` as `x` `;`."""
    try:
        words = shlex.split(logical, comments=True)
    except ValueError:
        words = logical.split()  # an unbalanced quote: checked word by word all the same
    split: List[str] = []
    for word in words:
        split += [word[:-1], ";"] if word.endswith(";") and word != ";" else [word]
    return split


def simple_commands(words: List[str]) -> Iterator[List[str]]:
    """The words split at && || ; | &, without redirections and leading VAR=value assignments."""
    current: List[str] = []
    skip_next = False
    for word in words + [";"]:
        if skip_next:
            skip_next = False
        elif word in SHELL_OPERATORS:
            while current and ENV_ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                yield current
            current = []
        elif REDIRECTION_TO_FILE.match(word):
            skip_next = True
        elif not REDIRECTION_WORD.match(word):
            current.append(word)


def commands(page: Path, text: str) -> Iterator[Command]:
    """Every simple command of the page's ```bash blocks, with the line it starts on."""
    for line, logical in bash_lines(text):
        for argv in simple_commands(shell_words(logical)):
            yield Command(f"{rel(page)}:{line}", argv)


def is_python(word: str) -> bool:
    return word in PYTHON_LAUNCHERS or word.endswith(("/python", "/python3"))


def script_and_args(argv: List[str]) -> Optional[Tuple[str, List[str]]]:
    """(script, its arguments) when the command runs one this test checks: `python[3] S.py ...`,
    `torchrun [opts] S.py ...`, `python -m torch.distributed.run [opts] S.py ...`, `bash S.sh ...`;
    else None (pip, cd, pytest ...)."""
    if len(argv) >= 2 and argv[0] in ("bash", "sh") and LAUNCHER_SCRIPT.match(argv[1].removeprefix("./")):
        return argv[1].removeprefix("./"), argv[2:]
    if not is_python(argv[0]):
        return None
    index = next((i for i, word in enumerate(argv) if word.endswith(".py")), None)
    if index is None:
        return None
    launcher_options = argv[1:index]
    if "-c" in launcher_options or ("-m" in launcher_options and not any(
            module in launcher_options for module in TORCH_RUN_MODULES)):
        return None  # python -m pytest tests/x.py, python -c ...
    script = argv[index].removeprefix("./")
    if script in ("main.py", "demo.py") or TOOL_SCRIPT.match(script):
        return script, argv[index + 1:]
    return None


class ArgparseError(Exception):
    """What argparse would have printed before exiting with status 2."""


class ParserFound(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def main_parser() -> argparse.ArgumentParser:
    """main.py's command line, as main.cli() builds it."""
    from main import get_args_parser
    return argparse.ArgumentParser("SAM-DETR", parents=[get_args_parser()])


def tool_parser(name: str) -> argparse.ArgumentParser:
    """A tool's parser: from its build_parser()/get_parser() when it has one; else its parse_args()
    or main() is called and stopped at its first parse_args, before it parses (or runs) anything."""
    module = importlib.import_module(f"tools.{name}")
    for builder in PARSER_BUILDERS:
        if hasattr(module, builder):
            return getattr(module, builder)()

    def stop(parser, *args, **kwargs):
        raise ParserFound(parser)

    entry = next(getattr(module, e) for e in PARSER_ENTRIES if inspect.isfunction(getattr(module, e, None)))
    # both parsing methods stop, so that a tool is never run by this test
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), \
            mock.patch.object(sys, "argv", [f"tools/{name}.py"]):
        try:
            entry([]) if inspect.signature(entry).parameters else entry()
        except ParserFound as found:
            return found.parser
    raise AssertionError(f"tools/{name}.py: {entry.__name__}() parsed no command line")


_PARSERS: Dict[str, argparse.ArgumentParser] = {}


def parser_for(script: str) -> argparse.ArgumentParser:
    """The argparse parser of a script (main.py's for the launchers, which pass their arguments on)."""
    if script not in _PARSERS:
        if script == "main.py" or LAUNCHER_SCRIPT.match(script):
            _PARSERS[script] = main_parser()
        elif script == "demo.py":
            import demo
            _PARSERS[script] = demo.build_parser()
        else:
            _PARSERS[script] = tool_parser(TOOL_SCRIPT.match(script).group(1))
    return _PARSERS[script]


def parse_problem(script: str, args: List[str]) -> Optional[str]:
    """argparse's complaint about `args` (an unknown flag, a bad value, a missing one), or None."""
    parser = parser_for(script)

    def error(message):
        raise ArgparseError(message)

    # no abbreviations: a shortened flag (--num_worker) breaks when a new flag shares its prefix
    with mock.patch.object(parser, "error", error), mock.patch.object(parser, "allow_abbrev", False):
        try:
            parser.parse_args(args)
        except ArgparseError as problem:
            return str(problem)
        except SystemExit as stop:  # --help: printed and exited with 0
            return None if stop.code in (0, None) else f"exited with {stop.code}"
    return None


def command_problem(script: str, args: List[str]) -> Optional[str]:
    """What is wrong with one command: a launcher script that does not exist, or arguments that its
    parser refuses (a launcher's arguments go to main.py)."""
    if not (ROOT / script).is_file():
        return "no such file"
    if LAUNCHER_SCRIPT.match(script) and not (args and args[0].startswith("--")):
        return None
    return parse_problem(script, args)


def check_commands(pages: Dict[Path, str]) -> Tuple[List[str], List[str], List[str]]:
    """(checked, skipped, problems) over the commands of the pages, each as 'file:line: ...'."""
    checked, skipped, problems = [], [], []
    for page, text in pages.items():
        for command in commands(page, text):
            found = script_and_args(command.argv)
            if found is None:
                continue
            script, args = found
            if any(PLACEHOLDER.search(word) for word in args):
                skipped.append(f"{command.where}: {shlex.join(command.argv)}")
                continue
            checked.append(f"{command.where}: {shlex.join(command.argv)}")
            problem = command_problem(script, args)
            if problem:
                problems.append(f"{command.where}: {script}: {problem}\n    {shlex.join(command.argv)}")
    return checked, skipped, problems


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_flags_doc_is_up_to_date():
    from tools import make_flags_doc
    assert FLAGS_DOC.is_file(), f"{rel(FLAGS_DOC)} missing: run {make_flags_doc.REGENERATE_COMMAND}"
    assert FLAGS_DOC.read_text() == make_flags_doc.render(), \
        f"{rel(FLAGS_DOC)} is out of date with the parsers: run {make_flags_doc.REGENERATE_COMMAND}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_and_anchors_resolve(page):
    problems = link_problems(page, page.read_text())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_commands_in_bash_blocks_parse():
    checked, skipped, problems = check_commands({page: page.read_text() for page in PAGES})
    assert not problems, f"{len(problems)} of {len(checked)} commands do not parse:\n" + "\n".join(problems)
    assert len(checked) >= MIN_CHECKED_COMMANDS, \
        f"only {len(checked)} commands checked (skipped: {skipped}); were commands lost or not recognised?"
    assert len(skipped) <= MAX_SKIPPED_SHARE * (len(checked) + len(skipped)), \
        "too many commands with placeholders, not checked:\n" + "\n".join(skipped)


# the checkers themselves, on small made-up pages
def test_slug_follows_github():
    assert slug("The original DETR (`--meta_arch detr`)") == "the-original-detr---meta_arch-detr"
    assert slug("Deployment (ONNX)") == "deployment-onnx"
    assert slug("bfloat16 on the CPU (`--amp bf16`)") == "bfloat16-on-the-cpu---amp-bf16"
    assert slug("Speed: the fastest flags on a GPU") == "speed-the-fastest-flags-on-a-gpu"
    assert slug("See [the tools](tools.md) / v1.2") == "see-the-tools--v12"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\nB\n---\n") == {"a", "a-1", "a-2", "b"}


def test_link_checker_finds_broken_links_but_not_code():
    page = ROOT / "README.md"
    text = ("# Top\n[ok](#top) [bad](#nope) ![img](docs/no_such.png)\n`[code](#nope)`\n"
            "```\n[in block](missing.md)\n```\n[web](https://example.com/x#y) [file](LICENSE)\n"
            "[multi\nline](#nope-again)\n")
    problems = link_problems(page, text)
    assert [p.split(": ")[0] for p in problems] == ["README.md:2", "README.md:2", "README.md:9"], problems


def test_command_extraction():
    page = ROOT / "README.md"
    text = ("```bash\nOMP_NUM_THREADS=1 python main.py --epochs 3 \\\n    --lr 1e-4  # a comment\n"
            "cd x && bash scripts/launch.sh --eval > log.txt 2>&1; python -m pytest -q\n"
            "# python main.py --not_a_flag\n```\n```\npython main.py --not_bash\n```\n")
    found = [(c.where, c.argv) for c in commands(page, text)]
    assert found == [("README.md:2", ["python", "main.py", "--epochs", "3", "--lr", "1e-4"]),
                     ("README.md:4", ["cd", "x"]), ("README.md:4", ["bash", "scripts/launch.sh", "--eval"]),
                     ("README.md:4", ["python", "-m", "pytest", "-q"])]
    assert script_and_args(["torchrun", "--nproc_per_node", "2", "main.py", "--eval"]) == ("main.py", ["--eval"])
    assert script_and_args(["python", "-m", "torch.distributed.run", "main.py"]) == ("main.py", [])
    assert script_and_args(["python", "-m", "pytest", "tests/test_x.py"]) is None
    assert script_and_args(["python", "-u", "tools/plot_logs.py", "r"]) == ("tools/plot_logs.py", ["r"])
    assert script_and_args(["python", "setup.py", "build"]) is None


def test_command_checker_catches_bad_flags_and_values():
    text = ("```bash\npython main.py --no_such_flag\npython main.py --meta_arch nope\npython main.py --epochs\n"
            "python demo.py --threshold 0.3\npython tools/plot_logs.py run --out x.png --bad\n"
            "bash scripts/no_such.sh\npython main.py --resume <ckpt>\npython main.py --epochs 3\n"
            "bash scripts/r50_e12_4gpu.sh --num_worker 2\n```\n")
    checked, skipped, problems = check_commands({ROOT / "README.md": text})
    assert len(checked) == 8 and len(skipped) == 1
    assert [p.split(": ")[0] for p in problems] == [f"README.md:{n}" for n in (2, 3, 4, 5, 6, 7, 10)], problems


def test_every_tool_parser_is_found_without_running_the_tool():
    """A new tool's commands can be checked too: its parser is reached whatever its layout."""
    tools = [p.stem for p in sorted((ROOT / "tools").glob("*.py")) if "argparse" in p.read_text()]
    for name in tools:
        assert isinstance(parser_for(f"tools/{name}.py"), argparse.ArgumentParser), name
