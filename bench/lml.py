"""LML (lambda, kappa) sweep against the base solver (also ``difflab bench lml``)."""

from difflab.benchmarks.lml import main

if __name__ == "__main__":
    main()
