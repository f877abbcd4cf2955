"""Pipelines that compose difflab's samplers and guidance with diffusers components."""

from .particles import FKCPipeline, ParticlePipelineOutput, SuperDiffPipeline

__all__ = ["FKCPipeline", "ParticlePipelineOutput", "SuperDiffPipeline"]
