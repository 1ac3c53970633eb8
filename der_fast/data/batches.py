"""Batches for training and evaluation.

In-memory datasets are augmented in batches with tensor ops (:func:`augment_batch`, random
crop with zero padding + horizontal flip, the same distribution as torchvision's
``RandomCrop(size, padding) + RandomHorizontalFlip``) and normalised with
:func:`normalize_batch`; both run on whatever device the batch lives on. Path-based datasets use
the per-image PIL transforms of :class:`DatasetInfo` through :class:`TransformDataset`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .datasets import ClassDataset, DataError, canonical_split, int64_array

# --------------------------------------------------------------------------------------------
# Batched augmentation (in-memory datasets)
# --------------------------------------------------------------------------------------------

def sample_augment_params(n: int, padding: int, flip: bool = True,
                          generator: Optional[torch.Generator] = None):
    """Random crop offsets and flip flags for :func:`augment_batch`, drawn in this order from
    ``generator`` (on its device): top ``i`` = randint(0, 2p+1, (n,)), left ``j`` likewise,
    then ``flip`` = rand(n) < 0.5 (only if ``flip``). Offsets are in the padded image."""
    dev = generator.device if generator is not None else torch.device("cpu")
    i = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    j = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    f = (torch.rand(n, generator=generator, device=dev) < 0.5) if flip else \
        torch.zeros(n, dtype=torch.bool, device=dev)
    return i, j, f


def crop_flip(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch at offsets (i, j) (same H x W as ``x``),
    then horizontal flip where ``flip``; one ``gather``, any dtype/device."""
    n, c, h, w = x.shape
    dev = x.device
    i, j, flip = i.to(dev), j.to(dev), flip.to(dev)
    if padding:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = i[:, None] + torch.arange(h, device=dev)                      # [n, h]
    ar = torch.arange(w, device=dev)
    cols = j[:, None] + torch.where(flip[:, None], w - 1 - ar, ar)        # [n, w]
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, hp * wp).gather(2, idx).view(n, c, h, w)


def augment_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                  padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Batched ``RandomCrop(H, padding) + RandomHorizontalFlip`` on ``x`` [N, C, H, W]
    (uint8 or float, un-normalised so the padding is black like torchvision's). Deterministic
    given ``generator``; see :func:`sample_augment_params` for the draw order."""
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0 or (padding == 0 and not flip):
        return x
    i, j, f = sample_augment_params(x.shape[0], padding, flip, generator)
    return crop_flip(x, i, j, f, padding)


def normalize_batch(x: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] (0..255) or float in [0, 1] -> normalised float32 (ToTensor +
    Normalize)."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# Per-image Dataset wrapper and batch iteration
# --------------------------------------------------------------------------------------------

class TransformDataset(torch.utils.data.Dataset):
    """torch Dataset over ``indices`` of one split, applying a per-image transform.

    ``train=True`` uses ``info.train_transform()``, else ``info.test_transform()`` (or pass
    ``transform``). Yields ``(image_tensor, label)`` with ``labels`` (default: the dataset's
    own) indexed by dataset index. With ``seed`` set, item k is transformed under
    ``torch.manual_seed(seed + k)`` inside a forked RNG, so random transforms are reproducible
    and the global RNG is left alone (also with worker processes).
    """

    def __init__(self, data: ClassDataset, split: str, indices=None, *, train: bool = False,
                 transform: Optional[Callable] = None, labels=None, seed: Optional[int] = None):
        self.data, self.split = data, canonical_split(split)
        y = data.labels(self.split) if labels is None else int64_array(labels)
        self.labels = y
        self.indices = np.arange(len(y)) if indices is None else int64_array(indices)
        if transform is None:
            transform = data.info.train_transform() if train else data.info.test_transform()
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, idx: int):
        from PIL import Image

        if self.data.in_memory:
            a = self.data.images(self.split)[idx].cpu().numpy()  # [C, H, W] uint8
            return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        path = self.data.paths(self.split)[idx]
        try:  # checked up front (check_image_files); a file changed since then is named too
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            why = (str(exc).splitlines() or [""])[0][:120]
            raise DataError(f"{self.data.info.name}: cannot read image {path} "
                            f"({type(exc).__name__}: {why}); remove or replace it") from exc

    def __getitem__(self, k: int):
        idx = int(self.indices[k])
        img = self._image(idx)
        if self.seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed + k) % (2 ** 63))
                x = self.transform(img)
        return x, int(self.labels[idx])


def iterate_batches(data: ClassDataset, split: str, indices, batch_size: int, *,
                    labels=None, augment: bool = False, shuffle: bool = False,
                    generator: Optional[torch.Generator] = None, drop_last: bool = False,
                    device=None, num_workers: int = 0) -> Iterator:
    """Yield ``(x, y)`` batches over ``indices`` of a split: ``x`` normalised float32
    [B, C, H, W] on ``device``, ``y`` int64 (``labels`` indexed by dataset index; default the
    dataset's own labels).

    ``shuffle`` permutes the order with ``generator``; ``augment`` applies the train
    augmentation, also drawn from ``generator`` (same generator -> same batches). In-memory
    datasets are sliced from their uint8 tensors and augmented in batch on ``device``
    (default: where the images live); path-based ones go through a DataLoader over
    :class:`TransformDataset` (``num_workers`` processes).
    """
    idx = int64_array(indices)
    y_all = data.labels(split) if labels is None else int64_array(labels)
    if shuffle and len(idx):
        idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
    n = len(idx)
    stop = n - n % batch_size if drop_last else n
    info = data.info
    if data.in_memory:
        images = data.images(split)
        dev = torch.device(device) if device is not None else images.device
        y_t = torch.from_numpy(y_all)
        for s in range(0, stop, batch_size):
            b = torch.from_numpy(idx[s:s + batch_size])
            x = images[b.to(images.device)].to(dev, non_blocking=True)
            if augment:
                x = augment_batch(x, generator, info.crop_padding, info.flip)
            yield normalize_batch(x, info.mean, info.std), y_t[b].to(dev, non_blocking=True)
        return
    seed = None
    if augment:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    ds = TransformDataset(data, split, idx[:stop], train=augment, labels=y_all, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, drop_last=drop_last,
                                         pin_memory=device is not None and
                                         torch.device(device).type == "cuda")
    for x, y in loader:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y
