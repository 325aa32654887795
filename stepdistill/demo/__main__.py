"""``python -m stepdistill.demo``: the same as ``stepdistill demo``."""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
