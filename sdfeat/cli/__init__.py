"""The command line: `sdfeat` (typer). Last in the flow: commands parse, validate and delegate to the library
(`app`); what they print is `console`'s, their help text `help`'s. Nothing imports this package.
"""

from sdfeat.cli.app import app

__all__ = ["app"]
