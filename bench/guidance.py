"""Guidance methods on digits-ddpm (also ``difflab bench guidance``)."""

from difflab.benchmarks.guidance import main

if __name__ == "__main__":
    main()
