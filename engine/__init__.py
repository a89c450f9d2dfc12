"""synthgen: synthetic image datasets from representation-conditioned diffusion models."""

__version__ = "0.1.0"
