"""How `sdfeat COMMAND --help` reads: click's plain style, whatever typer's version. Every `cli` command is made with
`Command`: arguments are NAME in the usage line and in their section (typer writes `{name}` and `name <type>`), and an
option that takes a value shows NAME (its own name) or, for a choice, `[a|b]` (typer writes `<int range>`,
`<list[str]>`). Nothing else of typer's help changes.
"""

from __future__ import annotations

import re

import click
from typer.core import TyperCommand

_TYPE = re.compile(r" <([^>]*)>$")  # typer's `<type>` after an option's flags


def _metavar(param: click.Parameter, shown: str) -> str:
    inner = shown.removeprefix("list[").removesuffix("]")
    return f"[{inner}]" if "|" in inner else (param.name or "value").upper()


class Command(TyperCommand):
    """A typer command whose help reads in click's plain style (see the module docstring)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [re.sub(r"^\{(\w+)\}", lambda m: m.group(1).upper(), piece) for piece in pieces]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, text = record
            if param.param_type_name == "argument":
                args.append(((param.metavar or param.name or name).upper(), text))
            else:
                opts.append((_TYPE.sub(lambda m: f" {_metavar(param, m.group(1))}", name), text))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
