"""`python -m sdfeat.cli`: the same as the `sdfeat` command."""

from sdfeat.cli.app import app

if __name__ == "__main__":
    app()
