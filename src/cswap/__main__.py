"""``python -m cswap``: the `cswap` command."""

from cswap.cli.main import app

app(prog_name="cswap")
