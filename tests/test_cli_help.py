"""Every command's --help renders, and says what its source says: no markup may eat "synthgen[ray]"."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from synthgen.cli import app

EXTRA = re.compile(r"[\w.-]+\[[\w,.-]+\]")  # a package with extras, e.g. synthgen[ray]


def commands(group, path: tuple[str, ...] = ()):
    """(path, command) of every command and group under `group`."""
    yield path, group
    if hasattr(group, "commands"):  # a group (typer may vendor its own click classes)
        for name, sub in group.commands.items():
            yield from commands(sub, (*path, name))


def source_texts(command) -> list[str]:
    return [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]


def test_every_help_page_renders_and_keeps_bracketed_extras():
    root = typer.main.get_command(app)
    seen = []
    for path, command in commands(root):
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=1000)
        assert result.exit_code == 0, (path, result.output)
        rendered = " ".join(result.output.split())
        for text in source_texts(command):
            for extra in EXTRA.findall(text):
                seen.append(extra)
                assert extra in rendered, f"'synthgen {' '.join(path)} --help' lost {extra!r}"
    # The pages name the extras that enable optional features; the check above is only as good as this.
    assert {"synthgen[ray]", "synthgen[dali]"} <= set(seen), seen
