"""AWM against a DDPO-style baseline on the digits models and a 2-D mixture (also ``difflab bench align``)."""

from difflab.benchmarks.align import main

if __name__ == "__main__":
    main()
