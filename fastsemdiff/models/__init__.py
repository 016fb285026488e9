"""The denoiser, the encoder and the model that joins them."""
from .dit import DiT, patchify, unpatchify
from .encoder import TimeEncoder
from .semantic import SemanticDiffusion, StepNoise, images_to_model_range

__all__ = ["DiT", "patchify", "unpatchify", "TimeEncoder", "SemanticDiffusion", "StepNoise", "images_to_model_range"]
