"""The README and docs/: a short landing page, links that resolve, every page in mkdocs.yml's nav, and README
commands that name things that exist. Fast and offline (a few `--help` runs and one `make -n`).

    .venv/bin/python -m pytest -q tests/test_docs.py

The site itself is built by .ci/run (`mkdocs build --strict`), which also checks anchors.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("**/*.md"))]
MAX_README_LINES = 250

# [text](target) and ![alt](target); the target up to the first space or closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def bash_blocks(text: str) -> list[str]:
    """The lines of every ```bash block, continuation lines joined."""
    lines, block, fenced = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not fenced and stripped in ("```bash", "```sh", "```shell"):
            fenced, block = True, []
        elif fenced and stripped.startswith("```"):
            fenced = False
            lines += "\n".join(block).replace("\\\n", " ").splitlines()
        elif fenced:
            block.append(line)
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (comments dropped; split at ; && || | and inside $(...)),
    each as its words with leading VAR=value assignments and `export` removed."""
    try:
        words = shlex.split(line.replace("$(", " ; "), comments=True)
    except ValueError:  # an unbalanced quote in a placeholder: check what comes before it
        words = line.split("#", 1)[0].split()
    out, current = [], []
    for word in words:
        if word in (";", "&&", "||", "|", "&"):
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    cleaned = []
    for cmd in out:
        while cmd and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]) or cmd[0] == "export"):
            cmd = cmd[1:]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def readme_commands() -> list[list[str]]:
    return [cmd for line in bash_blocks(README.read_text(encoding="utf-8")) for cmd in commands(line)]


def test_readme_is_a_landing_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move details to docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, an anchor on the same page (mkdocs --strict checks anchors)
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def nav_pages(nav) -> set[str]:
    found = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            found |= nav_pages(value)
        elif isinstance(value, str) and not re.match(r"^[a-z]+://", value):
            found.add(value)
    return found


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = nav_pages(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.glob("**/*.md")}
    assert pages - nav == set(), f"docs pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"mkdocs.yml's nav names pages that do not exist: {sorted(nav - pages)}"
    assert config.get("strict") is True


def test_readme_commands_name_what_exists():
    subcommands, targets, problems = set(), set(), []
    for cmd in readme_commands():
        name, args = os.path.basename(cmd[0]), cmd[1:]
        if name == "tunekit" and args and not args[0].startswith("-"):
            # `tunekit jobs migrate`, `tunekit adapters add`: the job's own subcommand too
            two = args[0] in ("jobs", "adapters") and len(args) > 1 and not args[1].startswith("-")
            subcommands.add(tuple(args[:2] if two else args[:1]))
        elif name == "make":
            targets |= {a for a in args if not a.startswith("-") and "=" not in a}
        elif re.fullmatch(r"python(3(\.\d+)?)?", name) and args:
            if args[0] == "-c":
                continue
            if args[0] == "-m":
                if not module_exists(args[1]):
                    problems.append(f"python -m {args[1]}: no such module")
            elif not (ROOT / args[0]).is_file():
                problems.append(f"python {args[0]}: no such file")
    assert subcommands and targets, "the README's bash blocks lost their tunekit and make commands"
    for sub in sorted(subcommands):
        proc = subprocess.run([sys.executable, "-m", "tunekit", *sub, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            problems.append(f"tunekit {' '.join(sub)} --help: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    proc = subprocess.run(["make", "-n", *sorted(targets)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        problems.append(f"make -n {' '.join(sorted(targets))}: {proc.stderr.strip()[-300:]}")
    assert not problems, "\n".join(problems)


def test_readme_benchmark_commands_parse():
    """The benchmark commands the README's prose quotes for its figures (`python bench/X.py FLAGS`): each script
    exists and takes those flags: run with --dry-run where the script has one (it prints its commands and
    runs nothing), else with --help."""
    quoted = sorted(set(re.findall(r"`python (bench/\w+\.py)([^`]*)`", README.read_text(encoding="utf-8"))))
    assert quoted, "the README quotes no benchmark command"
    problems = []
    for script, flags in quoted:
        if not (ROOT / script).is_file():
            problems.append(f"{script}: no such file")
            continue
        dry = "--dry-run" in (ROOT / script).read_text(encoding="utf-8")
        argv = [*flags.split(), "--dry-run"] if dry else ["--help"]
        proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            problems.append(f"python {script} {' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    assert not problems, "\n".join(problems)


def module_exists(name: str) -> bool:
    """`python -m name` would find it: a module, or a package with __main__ (looked up without importing it)."""
    parts = name.split(".")
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
        return True
    return importlib.util.find_spec(name) is not None


def test_the_command_parser_sees_through_shell():
    """What the README check relies on: assignments, export, $(...), comments and continuations."""
    [cmd] = commands('export KEY=$(python -c "import secrets; print(1)")  # a comment')
    assert cmd[:2] == ["python", "-c"]
    assert commands('LLM_BACKEND=openai tunekit chat --model finetuned "..."') == \
        [["tunekit", "chat", "--model", "finetuned", "..."]]
    assert commands("make setup serve-setup model   # once") == [["make", "setup", "serve-setup", "model"]]
    assert commands("cd x && tunekit demo") == [["cd", "x"], ["tunekit", "demo"]]
    block = "```bash\ntunekit build \\\n    --config x.yaml\n```\n"
    assert bash_blocks(block) == ["tunekit build      --config x.yaml"]
