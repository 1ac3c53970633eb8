"""The command line: ``python -m der_fast.train [flags]`` resolved into a Config, then run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .. import data as D
from .. import presets as P
from ..backbones import ARCHS
from .config import IMPLS, PRECISIONS, S_ANNEAL, STAGE2_MODES, Config, ConfigError, _merge
from .faults import Interrupted, NonFiniteLoss, WriteFailed, _print_or_drop
from .outputs import _read_ckpt, format_table
from .pipeline import run

_EPILOG = """\
presets (published protocols; every value can be overridden by a flag):
  {presets}
  precedence: defaults < --preset < --config FILE.json < flags. --epochs-scale F multiplies
  the schedule (epochs, warm-up, milestones, stage-2 epochs and milestones) coming from the
  defaults, the preset or the config file; epochs given as flags are taken literally.

multi-process (DistributedDataParallel; gloo on CPU, nccl on GPU):
  torchrun --standalone --nproc_per_node 4 -m der_fast.train --preset cifar100-b0-10 ...
  --batch-size is the global batch (split over processes); N processes train like
  1 process with --accum-steps N. Rank 0 writes OUT/.

seeds: --seed fixes data order, initialisation and augmentation; the class order has its
own --class-seed (1993, the field's convention).
"""


def _parser() -> argparse.ArgumentParser:
    """Every flag; defaults are None so that only given flags override (see config_from_args)."""
    p = argparse.ArgumentParser(
        prog="python -m der_fast.train",
        description="DER (Dynamically Expandable Representation) class-incremental training. "
                    "With no arguments: a multi-step run on Fashion-MNIST (works offline).",
        epilog=_EPILOG.format(presets="\n  ".join(
            f"{k:<18} {v[0]}" for k, v in sorted(P.PRESETS.items()))),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    a = p.add_argument
    a("--preset", choices=sorted(P.PRESETS),
      help="a published protocol's hyper-parameters (see below; python -m der_fast.presets)")
    a("--epochs-scale", dest="epochs_scale", type=float, metavar="F",
      help="scale the preset/config schedule by F (epochs, warm-up, milestones, stage 2; "
           "each at least 1 epoch) for shortened runs")
    a("--config", help="JSON file with Config fields (flags given on the command line win); "
                       "OUT/config.json of a run is such a file")
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
    a("--last-step", dest="last_step", type=int, metavar="T",
      help="stop after step T (0-based; default: the last). --resume DIR --last-step T "
           "extends a stopped run")
    a("--memory", dest="memory_total", type=int, help="exemplar memory, total")
    a("--memory-per-class", dest="memory_per_class", type=int,
      help="exemplar memory per class (instead of --memory)")
    a("--epochs", type=int, help=f"stage-1 epochs per step ({d.epochs})")
    a("--warmup-epochs", dest="warmup_epochs", type=int)
    a("--milestones", type=int, nargs="*", help="stage-1 epochs where lr is divided by 10")
    a("--init-epochs", dest="init_epochs", type=int,
      help="stage-1 epochs of step 0 (default: --epochs)")
    a("--init-lr", dest="init_lr", type=float, help="learning rate of step 0 (default: --lr)")
    a("--init-milestones", dest="init_milestones", type=int, nargs="*",
      help="step 0's epochs where lr is divided by 10 (default: --milestones)")
    a("--init-weight-decay", dest="init_weight_decay", type=float,
      help="weight decay of step 0 (default: --weight-decay)")
    a("--epochs-stage2", dest="epochs_stage2", type=int, help=f"stage-2 epochs ({d.epochs_stage2})")
    a("--lr-stage2", dest="lr_stage2", type=float)
    a("--milestones-stage2", dest="milestones_stage2", type=int, nargs="*",
      help="stage-2 epochs where lr is divided by 10 (default: half way)")
    a("--batch-size", dest="batch_size", type=int,
      help=f"global batch size, over all processes ({d.batch_size})")
    a("--accum-steps", dest="accum_steps", type=int,
      help="split each (per-process) batch into N micro-batches: gradient accumulation, "
           "BatchNorm per micro-batch (1)")
    a("--lr", type=float)
    a("--momentum", type=float)
    a("--weight-decay", dest="weight_decay", type=float)
    a("--color-jitter", dest="color_jitter", type=float, metavar="B",
      help="ColorJitter brightness B for training batches (0; CIFAR presets: 63/255)")
    a("--lambda-a", dest="lambda_a", type=float, help="auxiliary loss weight")
    a("--keep", type=float, metavar="R",
      help=f"parameter budget: the fraction of each new extractor's parameters that pruning "
           f"keeps; lambda_s is adapted during stage 1 to land there ({d.keep})")
    a("--lambda-s", dest="lambda_s", type=float,
      help="a fixed sparsity loss weight instead of a budget (replaces --keep)")
    a("--s-max", dest="s_max", type=float, help="mask annealing s_max (400)")
    a("--s-anneal", dest="s_anneal", choices=S_ANNEAL,
      help="mask temperature: s fixed at s_max, or annealed from 1/s_max to s_max within "
           "every epoch as in HAT/DER (fixed)")
    a("--mask-init", dest="mask_init", type=float,
      help=f"initial mask embedding e ({d.mask_init:g})")
    a("--mask-lr", dest="mask_lr", type=float,
      help=f"learning rate of the mask embeddings, plain SGD ({d.mask_lr:g})")
    a("--no-masks", dest="masks", action="store_false", default=None,
      help="DER without masks (and without pruning)")
    a("--masks", dest="masks", action="store_true", default=None, help=argparse.SUPPRESS)
    a("--no-prune", dest="prune", action="store_false", default=None)
    a("--prune", dest="prune", action="store_true", default=None, help=argparse.SUPPRESS)
    a("--stage2", choices=STAGE2_MODES, help="classifier learning: paper's re-training, "
                                             "PyCIL's weight aligning, or none")
    a("--temperature", type=float)
    a("--top5", action="store_true", default=None)
    a("--no-top5", dest="top5", action="store_false", default=None)
    a("--seed", type=int, help="seed of data order, initialisation and augmentation (1993); "
                               "the class order has --class-seed")
    a("--device", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    a("--impl", choices=IMPLS)
    a("--precision", choices=PRECISIONS,
      help="32 (float32), bf16 (torch.autocast to bfloat16; slower on a CPU without native "
           "bf16) or 16 (float16 autocast with a GradScaler; CUDA only) (32)")
    a("--compile", action="store_true", default=None,
      help="with --impl reference: torch.compile the model each training stage trains "
           "(recompiled whenever the model changes; compile time counts in the wall times; "
           "evaluation stays eager)")
    a("--out", help=f"output directory ({d.out})")
    a("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (it "
                                      "writes to DIR: --out, if given, must be DIR)")
    a("--overwrite", action="store_true",
      help="start afresh in an --out that already holds a run, replacing its results once "
           "the new run has passed every check (a fresh run never overwrites one otherwise)")
    a("--no-progress", dest="progress", action="store_false", default=None)
    a("--no-plots", dest="plots", action="store_false", default=None,
      help="do not write accuracy.png / params.png (metrics.csv is always written)")
    a("--tensorboard", action="store_true", default=None,
      help="also log to OUT/tensorboard (needs the tensorboard package)")
    a("--deterministic", action="store_true", default=None)
    return p


def config_from_args(argv=None):
    """Resolve the command line into a validated Config (and whether to resume).
    Precedence: defaults < --preset (or a config file's "preset") < --config < flags;
    --epochs-scale scales the first three layers' schedule."""
    p = _parser()
    args = p.parse_args(argv)
    special = ("config", "resume", "preset", "epochs_scale", "overwrite")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in special}
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume DIR continues with the config saved in DIR's checkpoint;"
                              " do not combine it with --preset or --config")
        saved = Path(args.resume) / "checkpoint.pt"
        if not saved.exists():
            raise ConfigError(f"--resume: no checkpoint in {args.resume}")
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            # the run in DIR goes on in DIR: another --out would resume (and rewrite) that one
            raise ConfigError(f"--resume {args.resume} continues the run in {args.resume} and "
                              f"writes there: drop --out {args.out} (to branch a run, copy its "
                              "directory and resume the copy)")
        base = dict(_read_ckpt(saved)["config"])
        base["out"] = args.resume
        if args.epochs_scale is not None and \
                args.epochs_scale != base.get("epochs_scale", 1.0):
            raise ConfigError("--epochs-scale cannot change when resuming (the checkpoint's "
                              f"schedule was scaled by {base.get('epochs_scale', 1.0)})")
    else:
        file_cfg = _read_config_file(args.config) if args.config else {}
        base = asdict(Config())
        preset = args.preset or file_cfg.get("preset")
        if preset:
            try:
                base = _merge(base, P.preset_config(preset))
            except (KeyError, TypeError):  # TypeError: a config file's odd "preset"
                raise ConfigError(f"unknown preset {preset!r}; choose one of "
                                  f"{', '.join(sorted(P.PRESETS))}") from None
        base = _merge(base, file_cfg)
        if args.epochs_scale is not None:
            try:
                base = P.scale_schedule(base, args.epochs_scale)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--epochs-scale: {exc}") from None
            base["epochs_scale"] = float(base.get("epochs_scale") or 1.0) * args.epochs_scale
    cfg = Config.from_dict(_merge(base, given))
    if cfg.init_cls == 0:
        cfg.init_cls = cfg.increment
    return cfg.validate(), bool(args.resume)


def _read_config_file(path: str) -> dict:
    """A --config file: a strict JSON object (no NaN / Infinity tokens)."""
    def no_constants(token):
        raise ValueError(f"{token} is not valid JSON")

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=no_constants)
    except (OSError, ValueError) as exc:  # ValueError: JSON syntax, not UTF-8 text
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    return d


def _resume_hint(cfg) -> str:
    """How to continue after an interruption (nothing when no stage was checkpointed)."""
    if cfg is None or not (Path(cfg.out) / "checkpoint.pt").exists():
        return ""
    return (f"; the last complete stage is checkpointed in {cfg.out}: continue with "
            f"--resume {cfg.out}")


def main(argv=None) -> int:
    """The CLI; exit status 0, 2 (bad config or data), 3 (non-finite loss), 4 (a result file
    could not be written, e.g. disk full) or 128 + signal (SIGTERM 143, SIGINT 130). A
    broken stdout (``| head -1``, a dead ``tee``, ``>/dev/full``) stops nothing: the
    messages are dropped, the run finishes and writes its files, the status is as above."""
    rank0 = os.environ.get("RANK", "0") == "0"
    say = _print_or_drop

    def error(msg):
        if rank0:
            try:
                print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)  # one line
            except OSError:  # stderr broken too: the exit status still tells
                pass

    cfg = None
    try:
        cfg, resume = config_from_args(argv)
        t0 = time.perf_counter()
        metrics = run(cfg, resume=resume, overwrite=_parser().parse_args(argv).overwrite,
                      log=say)
    except ConfigError as exc:
        error(exc)
        return 2
    except D.DataError as exc:  # during the run (the checks up front raise ConfigError)
        error(f"{exc}{_resume_hint(cfg)}")
        return 2
    except NonFiniteLoss as exc:
        error(f"{exc}; stopped: the last good checkpoint (the last complete stage) is kept in "
              f"{cfg.out}")
        return 3
    except WriteFailed as exc:
        error(f"{exc}; stopped: the last good checkpoint is kept in {cfg.out} (continue with "
              f"--resume {cfg.out} once the problem is fixed)")
        return 4
    except Interrupted as exc:
        error(f"{exc}{_resume_hint(cfg)}")
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C before the run's handler is in place, or pressed twice
        error(f"interrupted by SIGINT{_resume_hint(cfg)}")
        return 128 + int(signal.SIGINT)
    if not rank0:
        return 0
    s = metrics["summary"]
    say()
    say(format_table(metrics["steps"]))
    say(f"\naverage incremental top-1 {s['avg_incremental_top1']:.2f}  last top-1 "
        f"{s['last_top1']:.2f}  forgetting {s['forgetting']:.2f}  wall "
        f"{time.perf_counter() - t0:.1f} s")
    if "avg_incremental_nme" in s:
        say(f"average incremental NME {s['avg_incremental_nme']:.2f}  last NME "
            f"{s['last_nme']:.2f}  (nearest mean of exemplars)")
    unp = (f" (unpruned {s['avg_extractor_params_unpruned']:,.0f} / "
           f"{s['final_extractor_params_unpruned']:,})"
           if "avg_extractor_params_unpruned" in s else "")
    say(f"extractor parameters, average over steps / final: "
        f"{s['avg_extractor_params']:,.0f} / {s['final_extractor_params']:,}{unp}")
    say(f"metrics: {Path(cfg.out) / 'metrics.json'} (also metrics.csv, config.json"
        f"{', accuracy.png, params.png' if cfg.plots else ''})")
    return 0
