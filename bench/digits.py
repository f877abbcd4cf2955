"""Quality of the built-in digits models (also ``difflab bench digits``)."""

from difflab.benchmarks.digits import main

if __name__ == "__main__":
    main()
