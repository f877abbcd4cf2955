"""USF with S^3-searched solver schedules against diffusers' built-in solvers (mixture and digits-ddpm).

Thin wrapper over :mod:`difflab.benchmarks.usf` (also ``difflab bench usf``).
"""

from difflab.benchmarks.usf import main

if __name__ == "__main__":
    main()
