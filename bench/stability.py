"""Divergence at high guidance, with and without momentum (also ``difflab bench stability``)."""

from difflab.benchmarks.stability import main

if __name__ == "__main__":
    main()
