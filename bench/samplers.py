"""Quality versus NFE of difflab's and diffusers' schedulers on the exact Gaussian mixture.

Thin wrapper over :mod:`difflab.benchmarks.samplers` (also ``difflab bench samplers``).
"""

from difflab.benchmarks.samplers import main

if __name__ == "__main__":
    main()
