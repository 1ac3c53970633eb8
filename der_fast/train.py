"""The whole DER pipeline: ``python -m der_fast.train [flags]``.

Per step t: update_fc -> stage 1 (CE + aux CE + lambda_s * sparsity, masks annealed per batch)
-> pruning -> stage 2 (balanced classifier re-training with temperature, or weight aligning)
-> herding memory update -> evaluation. A checkpoint is written atomically after every stage;
``--resume DIR`` continues from the last complete one and reproduces an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from . import data as D
from .backbones import ARCHS
from .masks import anneal_s

__all__ = ["Config", "aux_targets", "run", "main"]

STAGE2_MODES = ("retrain", "weight_align", "none")
IMPLS = ("reference", "fast")


class ConfigError(ValueError):
    """A bad configuration (clear message, non-zero exit from the CLI)."""


@dataclass
class Config:
    """Every knob of a run; saved with the results. Defaults: the offline demo run."""

    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    # the default run uses the first 600/200 images per class: exactly the shipped subset, so it
    # gives the same result with or without the full Fashion-MNIST installed (0 = all images)
    train_per_class: Optional[int] = 600
    test_per_class: Optional[int] = 200
    backbone: str = "resnet32"
    init_cls: int = 2
    increment: int = 2
    class_seed: int = 1993
    memory_total: Optional[int] = 200
    memory_per_class: Optional[int] = None
    epochs: int = 4
    warmup_epochs: int = 0
    milestones: list = field(default_factory=list)  # stage-1 epochs where lr *= 0.1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_a: float = 1.0
    lambda_s: float = 1e-3
    s_max: float = 400.0
    masks: bool = True
    prune: bool = True
    mask_init: float = 1.0
    stage2: str = "retrain"
    epochs_stage2: int = 4
    lr_stage2: float = 0.1
    milestones_stage2: list = field(default_factory=list)
    temperature: float = 5.0
    top5: bool = False
    seed: int = 1993
    device: str = "auto"
    impl: str = "reference"
    out: str = "runs/der"
    progress: bool = True
    deterministic: bool = False

    def validate(self) -> "Config":
        if self.backbone not in ARCHS:
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {sorted(ARCHS)}")
        if self.impl not in IMPLS:
            raise ConfigError(f"unknown impl {self.impl!r}; choose one of {IMPLS}")
        if self.stage2 not in STAGE2_MODES:
            raise ConfigError(f"unknown stage2 {self.stage2!r}; choose one of {STAGE2_MODES}")
        if (self.memory_total is None) == (self.memory_per_class is None):
            raise ConfigError("give exactly one of memory_total / memory_per_class")
        for name in ("epochs", "batch_size", "increment"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs_stage2", "warmup_epochs", "init_cls"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.lr_stage2 <= 0 or self.s_max <= 0 or self.temperature <= 0:
            raise ConfigError("lr, lr_stage2, s_max and temperature must be > 0")
        if self.lambda_s < 0 or self.lambda_a < 0:
            raise ConfigError("lambda_s and lambda_a must be >= 0")
        if self.prune and not self.masks:
            raise ConfigError("pruning needs masks: use --no-prune with --no-masks")
        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) == 0:
                setattr(self, name, None)  # 0 = all images
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 0 (0 = all)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**d)


def aux_targets(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Labels of DER's auxiliary classifier: every old class -> 0, new class c -> c - n_old + 1."""
    return torch.where(y < n_old, torch.zeros_like(y), y - n_old + 1)


# ------------------------------------------------------------------------------ helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def _model_class(impl: str):
    if impl == "reference":
        from .reference import DERNet
        return DERNet
    from .fast import FastDERNet
    return FastDERNet


def _gen(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0]))
    return g


def _lr_at(epoch: int, base: float, warmup: int, milestones) -> float:
    if warmup and epoch < warmup:
        return base * (epoch + 1) / warmup
    return base * 0.1 ** sum(epoch >= m for m in milestones)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


# ------------------------------------------------------------------------------ stages
class NonFiniteLoss(RuntimeError):
    pass


def _run_epochs(model, params, data, indices, cfg, *, epochs, lr, milestones, warmup, seed_salt,
                device, loss_fn, after_backward=None, after_step=None, desc="", s_anneal=False):
    """Generic SGD loop; returns the mean loss of the last epoch."""
    groups = [{"params": [p for n, p in params if "mask_e" not in n],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if "mask_e" in n], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    pick = indices if callable(indices) else (lambda epoch: indices)
    bar = None
    last = float("nan")
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = _lr_at(epoch, lr, warmup, milestones)
        idx = pick(epoch)
        n_batches = max(1, math.ceil(len(idx) / cfg.batch_size))
        if bar is None:
            bar = _progress(epochs * n_batches, desc, cfg.progress)
        gen = _gen(cfg.seed, *seed_salt, epoch)
        total, count = 0.0, 0
        model.train()
        for b, (x, y) in enumerate(data.batches("train", idx, cfg.batch_size, augment=True,
                                                shuffle=True, generator=gen, device=device)):
            s = anneal_s(b, n_batches, cfg.s_max) if s_anneal else None
            if s is not None:
                model.set_s(s)
            loss = loss_fn(x, y)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{desc}: non-finite loss at epoch {epoch}, batch {b}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(s)
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.3f}")
        last = total / max(count, 1)
    if bar is not None:
        bar.close()
    return last


def stage1(model, data, indices, cfg, t, n_old, device) -> float:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lambda_a = cfg.lambda_a if t > 0 else 0.0
    use_masks = model.convnets[-1].mask_e is not None

    def loss_fn(x, y):
        out = model(x)
        loss = F.cross_entropy(out["logits"], y)
        if lambda_a > 0 and out["aux_logits"] is not None:
            loss = loss + lambda_a * F.cross_entropy(out["aux_logits"], aux_targets(y, n_old))
        if use_masks and cfg.lambda_s > 0:
            loss = loss + cfg.lambda_s * model.sparsity_loss()
        return loss

    after_backward = (lambda s: model.compensate_mask_grads(s, cfg.s_max)) if use_masks else None
    after_step = model.clamp_masks if use_masks else None
    milestones = cfg.milestones or [int(0.6 * cfg.epochs), int(0.85 * cfg.epochs)]
    loss = _run_epochs(model, params, data, indices, cfg, epochs=cfg.epochs, lr=cfg.lr,
                       milestones=[m for m in milestones if m > 0], warmup=cfg.warmup_epochs,
                       seed_salt=(t, 1), device=device, loss_fn=loss_fn,
                       after_backward=after_backward, after_step=after_step,
                       desc=f"step {t} stage 1", s_anneal=use_masks)
    if use_masks:
        model.set_s(cfg.s_max)
    return loss


def stage2(model, data, pool, cfg, t, device) -> float:
    """Balanced classifier re-training: every extractor frozen, H_t re-initialised and trained
    alone on a class-balanced subset (re-drawn each epoch) with logits / temperature."""
    model.freeze_conv()
    torch.manual_seed(cfg.seed * 7919 + t)
    model.reset_fc()
    labels = data.labels("train")
    params = list(model.fc.named_parameters())
    milestones = cfg.milestones_stage2 or [max(1, cfg.epochs_stage2 // 2)]

    def loss_fn(x, y):
        return F.cross_entropy(model(x)["logits"] / cfg.temperature, y)

    def subset(epoch):  # re-drawn every epoch
        return pool[D.balanced_subset(labels[pool], generator=_gen(cfg.seed, t, 2, epoch))]

    return _run_epochs(model, params, data, subset, cfg, epochs=cfg.epochs_stage2,
                       lr=cfg.lr_stage2, milestones=milestones, warmup=0, seed_salt=(t, 3),
                       device=device, loss_fn=loss_fn, desc=f"step {t} stage 2")
    return last


@torch.no_grad()
def extract(model, data, split, indices, batch_size, device) -> torch.Tensor:
    model.eval()
    feats = [model.extract_vector(x).float().cpu()
             for x, _ in data.batches(split, indices, batch_size, device=device)]
    return torch.cat(feats) if feats else torch.zeros(0, model.feature_dim)


@torch.no_grad()
def evaluate(model, data, t, cfg, device) -> dict:
    """Top-1 (and top-5) on the test images of all seen classes, plus accuracy per task."""
    model.eval()
    idx = data.test_indices(t)
    if cfg.test_per_class is not None:  # the first N test images of each class
        y = data.labels("test")[idx]
        keep = np.concatenate([idx[y == c][: cfg.test_per_class] for c in np.unique(y)])
        idx = np.sort(keep)
    preds, top5_hits, ys = [], [], []
    for x, y in data.batches("test", idx, 2 * cfg.batch_size, device=device):
        logits = model(x)["logits"].float()
        preds.append(logits.argmax(1).cpu())
        k = min(5, logits.shape[1])
        top5_hits.append((logits.topk(k, 1).indices == y[:, None]).any(1).cpu())
        ys.append(y.cpu())
    pred, y, hit5 = torch.cat(preds), torch.cat(ys), torch.cat(top5_hits)
    correct = pred == y
    per_task = []
    lo = 0
    for cls in data.steps[: t + 1]:
        hi = lo + len(cls)
        sel = (y >= lo) & (y < hi)
        per_task.append(100.0 * float(correct[sel].float().mean()) if sel.any() else float("nan"))
        lo = hi
    res = {"top1": 100.0 * float(correct.float().mean()), "per_task_top1": per_task,
           "n_test": int(len(y))}
    if cfg.top5:
        res["top5"] = 100.0 * float(hit5.float().mean())
    return res


def forgetting(per_task_history: list) -> float:
    """Average forgetting: for each task but the last, best accuracy at any earlier step minus
    accuracy at the final step, averaged (0 for a single step)."""
    if len(per_task_history) < 2:
        return 0.0
    final = per_task_history[-1]
    drops = []
    for j in range(len(final) - 1):
        best = max(h[j] for h in per_task_history[:-1] if len(h) > j)
        drops.append(best - final[j])
    return float(np.mean(drops)) if drops else 0.0


# ------------------------------------------------------------------------------ run
def _summary(steps: list) -> dict:
    if not steps:
        return {}
    accs = [s["top1"] for s in steps]
    out = {"avg_incremental_top1": float(np.mean(accs)), "last_top1": accs[-1],
           "forgetting": forgetting([s["per_task_top1"] for s in steps]),
           "avg_params": float(np.mean([s["params"] for s in steps])),
           "final_params": steps[-1]["params"],
           "total_time_s": float(sum(s["time_total_s"] for s in steps))}
    if "top5" in steps[0]:
        out["avg_incremental_top5"] = float(np.mean([s["top5"] for s in steps]))
        out["last_top5"] = steps[-1]["top5"]
    if all("params_unpruned" in s for s in steps):
        out["avg_params_unpruned"] = float(np.mean([s["params_unpruned"] for s in steps]))
    return out


def format_table(steps: list) -> str:
    head = (f"{'step':>4} {'classes':>7} {'top1':>7} {'top5':>7} {'params':>10} "
            f"{'unpruned':>10} {'stage1 s':>9} {'stage2 s':>9}")
    lines = [head, "-" * len(head)]
    for s in steps:
        top5 = f"{s['top5']:7.2f}" if "top5" in s else f"{'-':>7}"
        unp = f"{s['params_unpruned']:>10,}" if "params_unpruned" in s else f"{'-':>10}"
        lines.append(f"{s['step']:>4} {s['n_classes']:>7} {s['top1']:7.2f} {top5} "
                     f"{s['params']:>10,} {unp} {s['time_stage1_s']:9.1f} "
                     f"{s['time_stage2_s']:9.1f}")
    return "\n".join(lines)


def _env_info(device) -> dict:
    return {"der_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}


def _save_ckpt(out: Path, state: dict) -> None:
    _atomic_write(out / "checkpoint.pt", lambda p: torch.save(state, p))


def _load_ckpt(out: Path, cfg: Config) -> Optional[dict]:
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file: never a silent restart
        raise ConfigError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError(f"checkpoint {path} is not a der_fast checkpoint")
    saved = dict(state["config"])
    mine = asdict(cfg)
    ignore = {"out", "progress", "device", "impl"}
    diff = {k: (saved.get(k), mine[k]) for k in mine if k not in ignore and saved.get(k) != mine[k]}
    if diff:
        raise ConfigError(f"checkpoint {path} was made with another config: {diff}")
    return state


def run(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run the whole pipeline; returns the metrics dict (also written to OUT/metrics.json)."""
    cfg.validate()
    device = _device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc}") from exc

    try:
        data = D.IncrementalData(cfg.dataset, cfg.init_cls, cfg.increment, root=cfg.data_root,
                                 download=cfg.download, seed=cfg.class_seed,
                                 max_train_per_class=cfg.train_per_class)
    except D.DataError as exc:
        raise ConfigError(str(exc)) from exc
    memory = D.Memory(total=cfg.memory_total, per_class=cfg.memory_per_class)
    if cfg.memory_total is not None and cfg.memory_total < data.num_classes:
        raise ConfigError(f"memory_total {cfg.memory_total} is smaller than the number of "
                          f"classes ({data.num_classes})")
    if data.dataset.in_memory and device.type == "cuda":
        data.dataset = data.dataset.to(device)

    torch.manual_seed(cfg.seed)
    Net = _model_class(cfg.impl)
    model = Net(cfg.backbone, in_channels=data.info.channels, use_masks=cfg.masks,
                mask_init=cfg.mask_init).to(device)
    metrics = {"config": asdict(cfg), "env": _env_info(device), "class_order": data.order,
               "steps": [], "summary": {}}
    start_t, start_stage = 0, 0
    if resume:
        state = _load_ckpt(out, cfg)
        if state is None:
            raise ConfigError(f"--resume: no checkpoint in {out}")
        model.load_state_dict(state["model"])
        model.to(device)
        memory.load_state_dict(state["memory"])
        metrics["steps"] = state["steps"]
        start_t, start_stage = state["next"]
        partial = state.get("partial", {})
        log(f"resuming {out} at step {start_t}, stage {start_stage}")
    else:
        partial = {}
    log(f"DER on {cfg.dataset} ({data.num_classes} classes, {data.num_steps} steps: "
        f"{cfg.init_cls or cfg.increment} + {cfg.increment}/step), backbone {cfg.backbone}, "
        f"impl {cfg.impl}, device {device}")

    def ckpt(next_t, next_stage, partial):
        _save_ckpt(out, {"config": asdict(cfg), "model": model.state_dict(),
                         "memory": memory.state_dict(), "steps": metrics["steps"],
                         "next": (next_t, next_stage), "partial": partial,
                         "version": __version__})

    for t in range(start_t, data.num_steps):
        n_old, n_known = data.num_old(t), data.num_known(t)
        stage = start_stage if t == start_t else 0
        if stage == 0:
            partial = {}
            torch.manual_seed(cfg.seed * 1009 + t)
            model.update_fc(n_known)
            model.to(device)
            train_idx = np.concatenate([data.train_indices(t), memory.indices()])
            t0 = time.perf_counter()
            partial["loss_stage1"] = stage1(model, data, train_idx, cfg, t, n_old, device)
            partial["time_stage1_s"] = time.perf_counter() - t0
            partial["params_unpruned"] = model.num_params()
            partial["extractor_params_unpruned"] = model.extractor_params()
            if cfg.masks and cfg.prune:
                t0 = time.perf_counter()
                rep = model.prune()
                partial["time_prune_s"] = time.perf_counter() - t0
                partial["sparsity_kept"] = rep["params_after"] / rep["params_before"]
            stage = 1
            ckpt(t, 1, partial)
        if stage == 1:
            t0 = time.perf_counter()
            if t > 0 and cfg.stage2 == "retrain" and cfg.epochs_stage2 > 0:
                pool = np.concatenate([data.train_indices(t), memory.indices()])
                partial["loss_stage2"] = stage2(model, data, pool, cfg, t, device)
            elif t > 0 and cfg.stage2 == "weight_align":
                partial["weight_align_gamma"] = model.weight_align(n_known - n_old)
            partial["time_stage2_s"] = time.perf_counter() - t0
            model.freeze_conv()
            t0 = time.perf_counter()
            memory.update(
                lambda idx: extract(model, data, "train", idx, 2 * cfg.batch_size, device),
                data.labels("train"), data.new_classes(t))
            partial["time_memory_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate(model, data, t, cfg, device)
            time_eval = time.perf_counter() - t0
            row = {"step": t, "n_classes": n_known, "n_new": n_known - n_old, **ev,
                   "params": model.num_params(),
                   "extractor_params": model.extractor_params(),
                   "memory_size": len(memory), "time_eval_s": time_eval, **partial}
            if not (cfg.masks and cfg.prune):
                row.pop("params_unpruned", None)
                row.pop("extractor_params_unpruned", None)
            row["time_total_s"] = sum(v for k, v in row.items()
                                      if k.startswith("time_") and k != "time_total_s")
            metrics["steps"].append(row)
            metrics["summary"] = _summary(metrics["steps"])
            _write_json(out / "metrics.json", metrics)
            ckpt(t + 1, 0, {})
            log(format_table(metrics["steps"][-1:]) if t == 0 and not resume
                else format_table(metrics["steps"][-1:]).splitlines()[-1])
    metrics["summary"] = _summary(metrics["steps"])
    _write_json(out / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m der_fast.train",
        description="DER (Dynamically Expandable Representation) class-incremental training. "
                    "With no arguments: a multi-step run on Fashion-MNIST (works offline).")
    d = Config()
    a = p.add_argument
    a("--config", help="JSON file with Config fields (flags given on the command line win)")
    a("--dataset", choices=["fashion_mnist", "cifar100", "imagenet100", "imagefolder"])
    a("--data-root", dest="data_root", help="dataset folder (default: built-in / system copy)")
    a("--download", action="store_true", default=None, help="allow torchvision to download")
    a("--train-per-class", dest="train_per_class", type=int,
      help="use only the first N training images of each class (600; 0 = all)")
    a("--test-per-class", dest="test_per_class", type=int,
      help="evaluate on only the first N test images of each class (200; 0 = all)")
    a("--backbone", choices=sorted(ARCHS))
    a("--init-cls", dest="init_cls", type=int, help="classes in step 0 (0 = same as increment)")
    a("--increment", type=int, help="new classes per later step")
    a("--class-seed", dest="class_seed", type=int, help="seed of the class order (1993)")
    a("--memory", dest="memory_total", type=int, help="exemplar memory, total")
    a("--memory-per-class", dest="memory_per_class", type=int,
      help="exemplar memory per class (instead of --memory)")
    a("--epochs", type=int, help=f"stage-1 epochs per step ({d.epochs})")
    a("--warmup-epochs", dest="warmup_epochs", type=int)
    a("--milestones", type=int, nargs="*", help="stage-1 epochs where lr is divided by 10")
    a("--epochs-stage2", dest="epochs_stage2", type=int, help=f"stage-2 epochs ({d.epochs_stage2})")
    a("--lr-stage2", dest="lr_stage2", type=float)
    a("--batch-size", dest="batch_size", type=int)
    a("--lr", type=float)
    a("--weight-decay", dest="weight_decay", type=float)
    a("--lambda-a", dest="lambda_a", type=float, help="auxiliary loss weight")
    a("--lambda-s", dest="lambda_s", type=float, help="sparsity loss weight")
    a("--s-max", dest="s_max", type=float, help="mask annealing s_max (400)")
    a("--no-masks", dest="masks", action="store_false", default=None,
      help="DER without masks (and without pruning)")
    a("--no-prune", dest="prune", action="store_false", default=None)
    a("--stage2", choices=STAGE2_MODES, help="classifier learning: paper's re-training, "
                                             "PyCIL's weight aligning, or none")
    a("--temperature", type=float)
    a("--top5", action="store_true", default=None)
    a("--seed", type=int)
    a("--device", help="cpu, cuda, cuda:N or auto")
    a("--impl", choices=IMPLS)
    a("--out", help=f"output directory ({d.out})")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    a("--no-progress", dest="progress", action="store_false", default=None)
    a("--deterministic", action="store_true", default=None)
    return p


def config_from_args(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    base = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config}: {exc}") from exc
    if args.resume:
        saved = Path(args.resume) / "checkpoint.pt"
        if not saved.exists():
            raise ConfigError(f"--resume: no checkpoint in {args.resume}")
        base = dict(torch.load(saved, map_location="cpu", weights_only=False)["config"])
        base["out"] = args.resume
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "resume")}
    if given.get("memory_per_class") is not None and "memory_total" not in given:
        given["memory_total"] = None
    cfg = Config.from_dict({**base, **given})
    if cfg.init_cls == 0:
        cfg.init_cls = cfg.increment
    return cfg.validate(), bool(args.resume)


def main(argv=None) -> int:
    try:
        cfg, resume = config_from_args(argv)
        t0 = time.perf_counter()
        metrics = run(cfg, resume=resume)
    except (ConfigError, D.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}; the last good checkpoint is kept in {cfg.out}", file=sys.stderr)
        return 3
    s = metrics["summary"]
    print()
    print(format_table(metrics["steps"]))
    print(f"\naverage incremental top-1 {s['avg_incremental_top1']:.2f}  last top-1 "
          f"{s['last_top1']:.2f}  forgetting {s['forgetting']:.2f}  params (final) "
          f"{s['final_params']:,}  wall {time.perf_counter() - t0:.1f} s")
    print(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
