"""f-distill on a 2-D mixture of 8 unequal modes: mode coverage per f-divergence (also ``difflab bench distill``)."""

from difflab.benchmarks.distill import main

if __name__ == "__main__":
    main()
