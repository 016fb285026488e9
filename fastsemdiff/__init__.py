"""fastsemdiff: semantic image embeddings from self-conditional diffusion."""
__version__ = "0.1.0"


def load(path, device=None):
    """The trained model from a run directory or a ``model.safetensors``, in eval mode on the best device."""
    from .export import load_model

    return load_model(path, device=device)
