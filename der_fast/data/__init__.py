"""Data layer of der_fast: datasets, class-incremental splits, batching/augmentation and the
exemplar memory (iCaRL herding). It does not import the model: exemplar selection gets its
features from a callback.

* ``datasets``: :class:`DatasetInfo` per dataset name, :class:`ClassDataset`, :class:`DataError`.
* ``loaders``: Fashion-MNIST (IDX files or the subset shipped in der_fast/assets), CIFAR-100,
  ImageFolder / ImageNet-100; :func:`load_dataset`.
* ``incremental``: class order, steps, :class:`IncrementalData`, :func:`balanced_subset`.
* ``batches``: batched augmentation and normalisation, :func:`iterate_batches`,
  :class:`TransformDataset`.
* ``memory``: :func:`herding`, :class:`Memory`, :func:`make_feature_fn`.
"""

from .batches import (TransformDataset, augment_batch, crop_flip, iterate_batches,
                      normalize_batch, sample_augment_params)
from .datasets import DATASET_NAMES, ClassDataset, DataError, DatasetInfo, PathLike, dataset_info
from .incremental import IncrementalData, balanced_subset, class_order, make_steps
from .loaders import (ASSETS_DIR, EMBEDDED, EMBEDDED_FASHION_MNIST, FASHION_MNIST_CLASSES,
                      FASHION_MNIST_FILES, SYSTEM_FASHION_MNIST, check_image_files, limit_per_class,
                      load_cifar100,
                      load_dataset, load_fashion_mnist, load_fashion_mnist_embedded,
                      load_imagefolder, read_idx)
from .memory import Memory, herding, make_feature_fn

__all__ = [
    "DataError",
    "DatasetInfo",
    "ClassDataset",
    "DATASET_NAMES",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "load_fashion_mnist",
    "load_fashion_mnist_embedded",
    "load_cifar100",
    "load_imagefolder",
    "limit_per_class",
    "check_image_files",
    "class_order",
    "make_steps",
    "IncrementalData",
    "balanced_subset",
    "augment_batch",
    "sample_augment_params",
    "crop_flip",
    "normalize_batch",
    "TransformDataset",
    "iterate_batches",
    "herding",
    "Memory",
    "make_feature_fn",
    "PathLike",
    "ASSETS_DIR",
    "EMBEDDED",
    "EMBEDDED_FASHION_MNIST",
    "SYSTEM_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
]
