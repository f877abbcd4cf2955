"""FID: difflab against clean-fid on the same folders and weights (needs the eval extra; also ``difflab bench fid``)."""

from difflab.benchmarks.fid import main

if __name__ == "__main__":
    main()
