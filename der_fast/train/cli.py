"""The command line: ``python -m der_fast.train [flags]`` resolved into a Config, then run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from .. import data as D
from .. import presets as P
from .config import Config, ConfigError, merge_layers
from .faults import Interrupted, NonFiniteLoss, WriteFailed, print_or_drop
from .outputs import format_table, read_ckpt
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


# flags that are not Config fields, each listed after the field whose flags it follows
_NOT_FIELDS = {
    "epochs_scale": [(("--config",), dict(
        help="JSON file with Config fields (flags given on the command line win); "
             "OUT/config.json of a run is such a file"))],
    "out": [(("--resume",), dict(
        metavar="DIR", help="continue the run in DIR from its last checkpoint (it writes to "
                            "DIR: --out, if given, must be DIR)")),
            (("--overwrite",), dict(
                action="store_true",
                help="start afresh in an --out that already holds a run, replacing its results "
                     "once the new run has passed every check (a fresh run never overwrites "
                     "one otherwise)"))],
}


def _add_field(p: argparse.ArgumentParser, f, default) -> None:
    """The flags a Config field declares (config._knob), with default None: only the flags
    given override the lower layers."""
    m, spec = f.metadata, f.metadata["spec"]
    text = None if m["help"] is None else m["help"].format(default=default)
    if spec.kind is bool:
        for i, flag in enumerate(m["flags"] + m["hidden"]):
            p.add_argument(flag, dest=f.name, default=None,
                           action="store_false" if flag.startswith("--no-") else "store_true",
                           help=argparse.SUPPRESS if flag in m["hidden"] else
                           (text if i == 0 else None))
        return
    kw = dict(dest=f.name, help=text)
    choices = m["choices"] if m["choices"] is not None else spec.choices
    if choices is not None:
        kw["choices"] = choices
    elif spec.kind is list:
        kw.update(type=int, nargs="*")
    elif spec.kind in (int, float):
        kw["type"] = spec.kind
    if m["metavar"] is not None:
        kw["metavar"] = m["metavar"]
    p.add_argument(*m["flags"], **kw)


def _parser() -> argparse.ArgumentParser:
    """Every flag: the Config fields' in field order, with the few that are not fields among
    them (``_NOT_FIELDS``); defaults are None so that only given flags override (see
    config_from_args)."""
    p = argparse.ArgumentParser(
        prog="python -m der_fast.train",
        description="DER (Dynamically Expandable Representation) class-incremental training. "
                    "With no arguments: a multi-step run on Fashion-MNIST (works offline).",
        epilog=_EPILOG.format(presets="\n  ".join(
            f"{k:<18} {v[0]}" for k, v in sorted(P.PRESETS.items()))),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    for f in fields(Config):
        _add_field(p, f, getattr(d, f.name))
        for args, kw in _NOT_FIELDS.get(f.name, ()):
            p.add_argument(*args, **kw)
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
        base = dict(read_ckpt(saved)["config"])
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
                base = merge_layers(base, P.preset_config(preset))
            except (KeyError, TypeError):  # TypeError: a config file's odd "preset"
                raise ConfigError(f"unknown preset {preset!r}; choose one of "
                                  f"{', '.join(sorted(P.PRESETS))}") from None
        base = merge_layers(base, file_cfg)
        if args.epochs_scale is not None:
            try:
                base = P.scale_schedule(base, args.epochs_scale)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--epochs-scale: {exc}") from None
            base["epochs_scale"] = float(base.get("epochs_scale") or 1.0) * args.epochs_scale
    cfg = Config.from_dict(merge_layers(base, given))
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
    say = print_or_drop

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
