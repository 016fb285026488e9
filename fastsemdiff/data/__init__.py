"""Datasets: Fashion-MNIST, .npz/.npy arrays, image folders and VAE latents, batched on the device or streamed."""
from __future__ import annotations

from .arrays import load_arrays
from .dali_stream import dali_available
from .device_dataset import DeviceImageDataset, mix_seed, to_model_range
from .errors import DatasetError
from .fashion_mnist import DEFAULT_PATH, load_fashion_mnist
from .latent_store import LatentShards, read_manifest, resolve_latents_config
from .image_folder import ImageFolderData, load_image_folder, scan_image_folder
from .loader import build_train_data, choose_loader
from .splits import SOURCES, SPLITS, load_split
from .verify import check_images

LOADERS = ("auto", "dali", "torch")

__all__ = [
    "DEFAULT_PATH",
    "DatasetError",
    "DeviceImageDataset",
    "ImageFolderData",
    "LOADERS",
    "LatentShards",
    "SOURCES",
    "SPLITS",
    "build_train_data",
    "check_images",
    "choose_loader",
    "dali_available",
    "load_arrays",
    "load_fashion_mnist",
    "load_image_folder",
    "load_split",
    "mix_seed",
    "read_manifest",
    "resolve_latents_config",
    "scan_image_folder",
    "to_model_range",
]
