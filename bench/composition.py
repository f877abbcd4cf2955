"""FKC and SuperDiff on exact Gaussian-mixture targets (also ``difflab bench composition``)."""

from difflab.benchmarks.composition import main

if __name__ == "__main__":
    main()
