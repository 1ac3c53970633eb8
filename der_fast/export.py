"""``python -m der_fast.export RUN_DIR --out model.pt2``: the model of a run's last completed step
(pruned as trained, eval mode) as a ``torch.export`` program that torch alone loads and runs:
``torch.export.load("model.pt2").module()(x)``, no der_fast needed.

The program is the plain reference :class:`~der_fast.reference.DERNet` (no custom ops), built
from the run's checkpoint.pt. Input ``x``: float32 ``[batch, C, H, W]`` (any batch size; C, H, W
fixed by the run's dataset), normalised like the trainer's test batches. Output: the logits
``[batch, classes]`` (no auxiliary logits), or with ``--features`` the tuple ``(logits,
features)``. Metadata (step, classes, class order, input shape, mean/std, preprocessing) is
stored in the file as the extra file ``der_fast.json``. Before the file is written the command
runs the saved program and the DERNet on random batches of 1 and 5 images and refuses (exit 3)
if any output differs beyond float32 rounding; it prints the largest difference.

Exit status: 0 written; 2 bad RUN_DIR / checkpoint / --out (nothing written); 3 the program's
outputs differ from the model's (nothing written); 4 torch.export, saving or loading failed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import __version__

META = "der_fast.json"  # name of the metadata extra file inside the .pt2
CHECK_BATCHES = (1, 5)
TOL_ULPS = 16  # tolerance: this many float32 ulps of an output's largest magnitude (at least 1)


class ExportError(Exception):
    """A refused or failed export: the message and the exit status."""

    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


class Inference(nn.Module):
    """The exported forward of a DERNet: ``logits`` or ``(logits, features)``."""

    def __init__(self, net: nn.Module, features: bool = False):
        super().__init__()
        self.net, self.features = net, features

    def forward(self, x):
        out = self.net(x)
        return (out["logits"], out["features"]) if self.features else out["logits"]


def _preprocess(info) -> str:
    norm = "ToTensor (pixels / 255) then Normalize(mean, std) per channel"
    if info.in_memory:
        return f"{info.image_size}x{info.image_size} images as they are, {norm}"
    return (f"Resize({round(info.image_size * 256 / 224)}) + CenterCrop({info.image_size}), "
            f"{norm}")


def load_run(run: Path):
    """The rebuilt reference DERNet (eval, float32) of ``run``'s last completed step and the
    metadata; ExportError (status 2) when there is none."""
    from .data import class_order, dataset_info
    from .reference import DERNet
    from .train.config import ConfigError
    from .train.outputs import read_ckpt

    ckpt = run / "checkpoint.pt"
    if not run.is_dir():
        raise ExportError(f"run directory {run} does not exist")
    if not ckpt.is_file():
        raise ExportError(f"{run} is not a der_fast run directory: it has no checkpoint.pt")
    try:
        state = read_ckpt(ckpt)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    cfg, nxt, steps = state["config"], state.get("next"), state.get("steps")
    if not (isinstance(nxt, (list, tuple)) and len(nxt) == 2 and all(type(v) is int for v in nxt)
            and isinstance(steps, list) and len(steps) == nxt[0]
            and all(isinstance(r, dict) for r in steps)):
        raise ExportError(f"checkpoint {ckpt} is incomplete or inconsistent (position {nxt!r})")
    t, stage = nxt
    resume = f"python -m der_fast.train --resume {run}"
    if t == 0:
        raise ExportError(f"the run in {run} has not completed step 0 (checkpoint at step 0, "
                          f"stage {stage}): no model to export yet; continue it with {resume}")
    if stage != 0:
        raise ExportError(
            f"checkpoint {ckpt} holds step {t} half-way (after stage 1): step {t - 1}'s model is "
            f"no longer stored and step {t}'s is unfinished; finish step {t} with {resume} "
            f"--last-step {t}, then export")
    try:
        info = dataset_info(cfg["dataset"])
        extra = state["model"].get("_extra_state") or {}
        net = DERNet(cfg["backbone"], in_channels=int(extra.get("in_channels", info.channels)),
                     use_masks=bool(cfg.get("masks", True)))
        net.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"checkpoint {ckpt}: its model does not load: "
                          f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    net.float().eval()
    if steps[-1].get("n_classes", net.n_classes) != net.n_classes:
        raise ExportError(f"checkpoint {ckpt} is inconsistent: its model has {net.n_classes} "
                          f"classes, its step {t - 1} row {steps[-1].get('n_classes')}")
    order = None
    try:
        order = json.loads((run / "metrics.json").read_text())["class_order"]
    except (OSError, ValueError, KeyError, TypeError):
        if info.num_classes > 0:
            order = class_order(info.num_classes, cfg.get("class_seed", 1993))
    order = order if isinstance(order, list) and order else None
    inc = cfg.get("increment") or 0
    init = cfg.get("init_cls") or inc
    n_steps = 1 + (len(order) - init) // inc if order and inc else None
    meta = {"format": "der_fast.export/1", "der_fast": __version__, "torch": torch.__version__,
            "run": str(run.resolve()), "step": t - 1, "steps_total": n_steps,
            "finished": n_steps is not None and t == n_steps, "n_classes": net.n_classes,
            "task_sizes": list(net.task_sizes), "backbone": net.backbone,
            "feature_dim": net.feature_dim, "params": net.num_params(), "dataset": info.name,
            "top1": steps[-1].get("top1"),
            "logit_classes": order[:net.n_classes] if order else None,
            "input": {"shape": ["batch", net.in_channels, info.image_size, info.image_size],
                      "dtype": "float32", "mean": list(info.mean), "std": list(info.std),
                      "preprocess": _preprocess(info)}}
    return net, meta


def _check_out(run: Path, out: Path, overwrite: bool) -> None:
    """Never a run's own file, a directory, or (without ``overwrite``) an existing file."""
    from .train.outputs import RESULT_FILES

    own = set(RESULT_FILES) | {"tensorboard", ".write_test"}
    own |= {f + ".tmp" for f in own}
    target, home = out.resolve(), run.resolve()
    if target == home or (home in target.parents
                          and target.relative_to(home).parts[0] in own):
        raise ExportError(f"--out {out} would replace the run's own "
                          f"{'directory' if target == home else 'file'} {target}; choose "
                          "another name, e.g. RUN_DIR/model.pt2")
    if out.suffix != ".pt2":
        raise ExportError(f"--out {out} must end in .pt2 (torch.export's archive format)")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name such as {out}/model.pt2")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"--out {out} already exists; replace it with --overwrite")


def _reference(net, x, features: bool) -> tuple:
    out = net(x)
    return (out["logits"], out["features"]) if features else (out["logits"],)


def max_difference(program, net, meta: dict, features: bool) -> float:
    """Run ``program`` and ``net`` (eval) on random batches of :data:`CHECK_BATCHES` images;
    the largest absolute difference, ExportError (status 3) beyond float32 rounding."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in CHECK_BATCHES:
        x = torch.randn(n, *meta["input"]["shape"][1:], generator=g)
        with torch.no_grad():
            want, got = _reference(net, x, features), program(x)
        got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        if [(o.shape, o.dtype) for o in got] != [(w.shape, w.dtype) for w in want]:
            raise ExportError(f"the exported program's outputs {[tuple(o.shape) for o in got]} "
                              f"do not match the model's {[tuple(w.shape) for w in want]}", 3)
        for o, w in zip(got, want):
            d = (o - w).abs().max().item()
            tol = TOL_ULPS * torch.finfo(torch.float32).eps * max(1.0, w.abs().max().item())
            if not d <= tol:  # NaN fails too
                raise ExportError(f"the exported program differs from the model: max |diff| "
                                  f"{d:.3g} > {tol:.3g} (batch of {n}); nothing written", 3)
            worst = max(worst, d)
    return worst


def export_run(run_dir, out, overwrite: bool = False, features: bool = False,
               log=print) -> dict:
    """Export ``run_dir``'s last completed step to ``out`` (see the module doc); returns the
    metadata stored with it. ExportError on any refusal or failure (``out`` then untouched)."""
    run, out = Path(run_dir), Path(out)
    net, meta = load_run(run)
    _check_out(run, out, overwrite)
    meta["outputs"] = ["logits", "features"] if features else ["logits"]
    c, h, w = meta["input"]["shape"][1:]
    try:
        program = torch.export.export(
            Inference(net, features).eval(), (torch.zeros(2, c, h, w),),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        raise ExportError(f"torch.export failed: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0]}", 4) from None
    meta["max_abs_diff"] = max_difference(program.module(), net, meta, features)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part.pt2")  # torch wants a .pt2 name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, tmp, extra_files={META: json.dumps(meta, indent=1)})
        loaded = torch.export.load(tmp).module()
        diff = max(meta["max_abs_diff"], max_difference(loaded, net, meta, features))
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot write or read back {out}: {type(exc).__name__}: {exc}", 4) \
            from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not meta["finished"]:
        total = f"0..{meta['steps_total'] - 1}" if meta["steps_total"] else "an unknown number"
        print(f"warning: the run is unfinished (steps {total}): exported its last completed "
              f"step, {meta['step']}", file=sys.stderr)
    i, top1 = meta["input"], meta["top1"]
    top1 = f"{top1:.2f}" if isinstance(top1, (int, float)) else "?"
    log(f"exported step {meta['step']} of {run} ({meta['n_classes']} classes, "
        f"{meta['params']:,} parameters, test top-1 {top1}) to {out}\n"
        f"input: float32 [batch, {c}, {h}, {w}], {i['preprocess']}: mean {i['mean']}, std "
        f"{i['std']}\noutput: {' and '.join(meta['outputs'])}\n"
        f"max |exported - DERNet| = {diff:.3g} over batches of {CHECK_BATCHES} random images")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m der_fast.export", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run's --out directory (with checkpoint.pt)")
    p.add_argument("--out", metavar="FILE.pt2", help="the program file (RUN_DIR/model.pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--features", action="store_true",
                   help="output (logits, features) instead of the logits alone")
    args = p.parse_args(argv)
    try:
        export_run(args.run, args.out or Path(args.run) / "model.pt2", args.overwrite,
                   args.features)
    except ExportError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
