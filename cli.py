"""`python cli.py ...` is the same as `probe ...`."""
from probe.cli import cli

if __name__ == "__main__":
    cli()
