"""compinv-rt: compositional inversion for Stable Diffusion (training, export, fast generation)."""

__version__ = "0.1.0"
