"""Data sets and transforms for training and verification.

``load_dataset(name, split)`` returns PIL images with labels (a registry of data sets: scikit-learn's
offline digits, torchvision's pets, CIFAR, SVHN, Food-101, Flowers-102, FGVC-Aircraft, and a user's
``imagefolder:PATH``); ``eval_transform``/``train_transform`` turn a checkpoint's recorded
preprocessing into timm transforms. Importing this package does not import torch.
"""

from atexport.data.datasets import (
    IMAGE_SUFFIXES,
    SPLITS,
    ArrayImageDataset,
    DatasetEntry,
    FileImageDataset,
    ImageDataset,
    SubsetDataset,
    available_datasets,
    dataset_entry,
    default_data_dir,
    load_dataset,
    load_splits,
    register_dataset,
    seeded_subset,
    stratified_split,
)
from atexport.data.transforms import TransformDataset, eval_transform, train_transform

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "ArrayImageDataset",
    "DatasetEntry",
    "FileImageDataset",
    "ImageDataset",
    "SubsetDataset",
    "TransformDataset",
    "available_datasets",
    "dataset_entry",
    "default_data_dir",
    "eval_transform",
    "load_dataset",
    "load_splits",
    "register_dataset",
    "seeded_subset",
    "stratified_split",
    "train_transform",
]
