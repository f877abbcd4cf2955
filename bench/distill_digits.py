"""One-step students of digits-ddpm: f-distill and DisBack, FD-digits versus generator steps."""

from difflab.benchmarks.distill_digits import main

if __name__ == "__main__":
    main()
