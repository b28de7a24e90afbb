"""MkDocs hooks: pages generated from the sources, so that nothing is written twice.

- ``reproductions/<name>.md``: one page per ``benchmarks/results/<name>.md``, included verbatim (the numbers
  live in the file the benchmark script wrote), with the pictures beside it;
- ``<!-- pyrovae:cli-reference -->`` in a page becomes the reference of every command and flag, built from the
  argparse parser that ``pyrovae`` itself runs (``pyrovae.cli.commands.parser``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLI_MARK = "<!-- pyrovae:cli-reference -->"
# The installed layout, as links: models/ and guides/ are installed as pyrovae.models and pyrovae.guides
# (setuptools package-dir), which the API reference's static analysis cannot see in the checkout itself.
SOURCE_VIEW = ROOT / ".cache" / "docs-src" / "pyrovae"


def _link_installed_layout() -> None:
    SOURCE_VIEW.mkdir(parents=True, exist_ok=True)
    targets = {p.name: p for p in (ROOT / "pyrovae").iterdir() if p.name != "__pycache__"}
    targets.update(models=ROOT / "models", guides=ROOT / "guides")
    for stale in SOURCE_VIEW.iterdir():
        if stale.is_symlink() and stale.name not in targets:
            stale.unlink()
    for name, target in targets.items():
        link = SOURCE_VIEW / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


_link_installed_layout()


def result_pages() -> list[Path]:
    """The benchmark results that get a reproduction page (every ``*.md`` the scripts committed)."""
    return sorted(p for p in RESULTS.glob("*.md") if not p.name.endswith(".quick.md"))


def on_files(files, config):
    for path in result_pages():
        text = path.read_text(encoding="utf-8")
        note = (f"\n\n!!! note \"Generated\"\n    This page is `benchmarks/results/{path.name}` as its benchmark "
                "script wrote it; the numbers are written once, there.\n")
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):  # keep the file's own title first, then say where it comes from
            text = lines[0] + note + "\n".join(lines[1:]) + "\n"
        else:
            text = f"# {path.stem}" + note + text
        files.append(File.generated(config, f"reproductions/{path.name}", content=text))
    changelog = ROOT / "CHANGELOG.md"
    if changelog.exists():
        files.append(File.generated(config, "changelog.md", content=changelog.read_text(encoding="utf-8")))
    files.append(File.generated(config, "examples.md", content=examples_page()))
    for path in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"reproductions/{path.name}", abs_src_path=str(path)))
    return files


def examples_page() -> str:
    """One section per ``examples/*.py``: its docstring (what it shows, how to run it) and its source."""
    import ast

    out = ["# Examples", "",
           "Short complete programs to copy from, in `examples/`. Each runs in full with the command in its "
           "docstring, and in a few seconds with `--smoke` (small synthetic data); `tests/test_examples.py` runs "
           "every one with `--smoke`. This page is generated from the files.", ""]
    first = ["custom_model", "conditional_vae", "flow_posterior", "discrete_vimco", "draw_attention", "sentence_vae",
             "geco_vs_beta", "bayesian_decoder", "torchrun_launch"]  # the README's order; any other example after them
    paths = sorted((ROOT / "examples").glob("*.py"), key=lambda p: (first.index(p.stem) if p.stem in first else len(first), p.stem))
    for path in paths:
        source = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source)) or ""
        title, _, rest = doc.partition("\n")
        out += [f"## {title.strip().rstrip('.') or path.stem}", "", f"`examples/{path.name}`", "", rest.strip(), "",
                '??? example "Source"', "", "    ```python"]
        out += [("    " + line).rstrip() for line in source.splitlines()]
        out += ["    ```", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._HelpAction,)):
        return ""
    if action.default is False and action.nargs == 0:
        return ""
    return f"`{action.default}`" if not isinstance(action.default, (list, tuple)) else "`" + " ".join(map(str, action.default)) + "`"


def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        names += "<br>" + " \\| ".join(f"`{c}`" for c in action.choices)
    elif action.nargs != 0 and action.option_strings and action.metavar:
        names += f" `{action.metavar}`"
    return names


def cli_reference() -> str:
    from pyrovae.cli.commands import parser

    top = parser()
    out = [f"Generated from `pyrovae.cli.commands.parser()` at build time: `{top.format_usage().strip()}`", "",
           "| option | meaning |", "|---|---|"]
    out += [f"| {_flags(a)} | {_cell(a.help or '')} |" for a in top._actions if a.option_strings]
    out.append("")
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, cmd in sub.choices.items():
        positional = " ".join(a.metavar or a.dest.upper() for a in cmd._actions if not a.option_strings)
        out += [f"### `pyrovae {name}`", "", _cell(cmd.description or summaries.get(name) or ""), "",
                f"`pyrovae {name} {positional} [OPTIONS]`".replace("  ", " "), ""]
        for group in cmd._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            out += [f"**{group.title}**", "", "| option | default | meaning |", "|---|---|---|"]
            for a in actions:
                help_text = "" if a.help == argparse.SUPPRESS else (a.help or "")
                help_text = help_text.replace("%(default)s", str(a.default)).replace("%%", "%")
                out.append(f"| {_flags(a)} | {_default(a)} | {_cell(help_text)} |")
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    return markdown
