"""The denoiser, the encoder and the model that joins them."""
from .dit import DiT, load_dit_state_dict, patchify, unpatchify
from .encoder import TimeEncoder
from .semantic import SemanticDiffusion, StepNoise, images_to_model_range

__all__ = ["DiT", "load_dit_state_dict", "patchify", "unpatchify", "TimeEncoder", "SemanticDiffusion", "StepNoise",
           "images_to_model_range"]
