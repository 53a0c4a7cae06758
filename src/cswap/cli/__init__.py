"""The `cswap` command line."""
