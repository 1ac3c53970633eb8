"""Training batches: seeded draws, shuffle, augmentation, brightness jitter, micro-batches."""

from __future__ import annotations

import numpy as np
import torch

from .. import data as D
from ..backbones import ARCHS


def seeded_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *salt)``: one independent stream per use."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0]))
    return g


def _jitter_factors(n: int, brightness: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness=b) factors, uniform in [max(0, 1-b), 1+b]."""
    lo, hi = max(0.0, 1.0 - brightness), 1.0 + brightness
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _brightness(x: torch.Tensor, factors: torch.Tensor, info) -> torch.Tensor:
    """Brightness jitter on a normalised batch, in pixel space [0, 1] (clamped, like
    torchvision's adjust_brightness), then normalised again."""
    mean = torch.as_tensor(info.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(info.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    f = factors.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return ((x * std + mean) * f).clamp_(0.0, 1.0).sub_(mean).div_(std)


def min_images(model, data) -> int:
    """Images a training micro-batch needs: 2 where the model's backbone reduces the data's
    images to a 1x1 feature map (resnet18 on 28 / 32 pixels), since BatchNorm in training
    needs more than one value per channel; else 1 (also for a model or data without a
    der_fast backbone / DatasetInfo)."""
    arch = ARCHS.get(getattr(model, "backbone", None))
    size = getattr(getattr(data, "info", None), "image_size", None)
    return 2 if arch is not None and size is not None and arch.feature_size(size) == 1 else 1


def train_batches(data, indices, cfg, gen, device, chunks: int = 1, mine=(0,),
                  force_sharded: bool = False):
    """Yield ``(parts, n)`` per global batch of ``cfg.batch_size``: ``n`` its size and
    ``parts`` this process's micro-batches ``[(x, y), ...]``.

    The global batches are exactly those of one process (``data.batches`` with shuffle and
    augmentation from ``gen``, then brightness jitter from ``gen``); each is cut into
    ``chunks`` contiguous pieces (piece k = rows ``[k n // chunks, (k+1) n // chunks)``) and
    ``mine`` lists the pieces of this process. Every rank makes the same random draws, so
    the pieces of all ranks put together are the single-process batch (same images, same
    crops, flips and jitter). A final batch with fewer than ``chunks`` images is skipped
    (only possible with chunks > 1)."""
    bs, cj, info = cfg.batch_size, cfg.color_jitter, data.info
    if chunks == 1 and not force_sharded:
        for x, y in data.batches("train", indices, bs, augment=True, shuffle=True,
                                 generator=gen, device=device):
            if cj > 0:
                x = _brightness(x, _jitter_factors(len(y), cj, gen), info)
            yield [(x, y)], len(y)
        return
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx):  # the draw order of data.iterate_batches: permutation first
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
    labels = data.labels("train")
    n_all = len(idx)
    spans = [(s, min(bs, n_all - s)) for s in range(0, n_all, bs)]

    def cut(nb, k):
        return k * nb // chunks, (k + 1) * nb // chunks

    ds = data.dataset
    if ds.in_memory:
        images = ds.images("train")
        dev = torch.device(device) if device is not None else images.device
        y_all = torch.from_numpy(labels)
        pad, flip = info.crop_padding, info.flip
        for s, nb in spans:
            b = idx[s:s + nb]
            draw = nb > 0 and (pad or flip)  # data.augment_batch's draws, whole batch
            if draw:
                i, j, f = D.sample_augment_params(nb, pad, flip, gen)
            fac = _jitter_factors(nb, cj, gen) if cj > 0 else None
            if nb < chunks:
                continue
            parts = []
            for k in mine:
                lo, hi = cut(nb, k)
                bb = torch.from_numpy(b[lo:hi])
                x = images[bb.to(images.device)].to(dev, non_blocking=True)
                if draw:
                    x = D.crop_flip(x, i[lo:hi], j[lo:hi], f[lo:hi], pad)
                x = D.normalize_batch(x, info.mean, info.std)
                if fac is not None:
                    x = _brightness(x, fac[lo:hi], info)
                parts.append((x, y_all[bb].to(dev, non_blocking=True)))
            yield parts, nb
        return
    # path-based (ImageFolder): the same per-image seeds as data.iterate_batches
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
    tds = D.TransformDataset(ds, "train", idx, train=True, labels=labels, seed=seed)
    sampler = [list(range(s + cut(nb, k)[0], s + cut(nb, k)[1]))
               for s, nb in spans if nb >= chunks for k in mine]
    pin = device is not None and torch.device(device).type == "cuda"
    it = iter(torch.utils.data.DataLoader(tds, batch_sampler=sampler, pin_memory=pin))
    for s, nb in spans:
        fac = _jitter_factors(nb, cj, gen) if cj > 0 else None
        if nb < chunks:
            continue
        parts = []
        for k in mine:
            x, y = next(it)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if fac is not None:
                lo, hi = cut(nb, k)
                x = _brightness(x, fac[lo:hi], info)
            parts.append((x, y))
        yield parts, nb
