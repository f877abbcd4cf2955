"""``python -m difflab ...``: the same command line as the ``difflab`` script."""

from .cli import main

if __name__ == "__main__":
    main()
