"""Small helpers shared by the test modules."""
import torch


def gen(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed: every test input is fresh random data, yet repeatable."""
    return torch.Generator().manual_seed(seed)
