"""A one-step student of a trained diffusers DDPMPipeline, through the generic pipeline path of `difflab distill`."""

from difflab.benchmarks.distill_pipeline import main

if __name__ == "__main__":
    main()
