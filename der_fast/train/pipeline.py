"""The whole run: per step update_fc, stage 1, pruning, stage 2, herding, evaluation, checkpoint."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from .. import data as D
from ..backbones import ARCHS
from .config import Config, ConfigError
from .distributed import Dist
from .evaluate import extract, step_row, summary
from .faults import Interrupted, print_or_drop, stop_signals
from .loop import Runtime
from .outputs import (Outputs, clear_run, env_info, format_table, load_ckpt, lock_out,
                      remove_run, save_ckpt, write_json)
from .stages import stage1, stage2, unpruned_counts


def _model_class(impl: str):
    """The model class of ``--impl`` (tests substitute variants here)."""
    if impl == "reference":
        from ..reference import DERNet
        return DERNet
    from ..fast import FastDERNet
    return FastDERNet


def run(cfg: Config, resume: bool = False, log=print_or_drop, overwrite: bool = False,
        dataset: Optional[D.ClassDataset] = None) -> dict:
    """Run the whole pipeline; returns the metrics dict (also written to OUT/metrics.json).
    A fresh run (not ``resume``) into a directory that holds a run is refused unless
    ``overwrite`` (the old run is removed only once the new one passed every check). OUT is
    locked (OUT/.lock) while the run writes it. ``log``: the messages (default: stdout,
    dropped once stdout breaks). ``dataset``: an already loaded dataset to run on instead of
    loading ``cfg.dataset`` (which then only names it in the results; ``cfg.train_per_class``
    still applies).

    Under torchrun (``WORLD_SIZE`` > 1) or inside an initialised torch.distributed process
    group, the training stages run data-parallel (see :mod:`der_fast.train.distributed`);
    every rank returns the same metrics, rank 0 writes the files."""
    cfg.validate()
    d = Dist.setup(cfg)
    ok = False
    deterministic = torch.are_deterministic_algorithms_enabled()  # restored after the run
    try:
        with stop_signals(), contextlib.ExitStack() as held:  # held: OUT/.lock
            say = log if d.main else (lambda *a, **k: None)
            data, memory, outputs = _prepare(cfg, say, d, resume, overwrite, dataset, held)
            try:
                metrics = _incremental_steps(cfg, resume, say, d, data, memory, outputs)
            finally:
                outputs.close()
        ok = True
        return metrics
    finally:
        torch.use_deterministic_algorithms(deterministic)
        d.close(ok)


def _probe_out(out: Path) -> None:
    """Create OUT/ and check it is writable (before any training)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc}") from exc


def _check_precision(precision: str, device: torch.device, say) -> None:
    """float16 autocast only on CUDA; bfloat16 on a CPU without native bf16 instructions runs
    (emulated), slower than float32: said once."""
    if precision == "16" and device.type != "cuda":
        raise ConfigError(f"precision 16 (float16 autocast with a GradScaler) needs a CUDA "
                          f"device, got {device}; on a CPU use --precision bf16")
    if precision == "bf16" and device.type == "cpu" and not (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        say("warning: this CPU has no native bfloat16 (AVX512_BF16 / AMX): --precision bf16 "
            "runs emulated, slower than float32")


def _prepare(cfg: Config, say, d: Dist, resume: bool, overwrite: bool, dataset, held):
    """Checks that need the process count, the output directory (locked for this run in
    ``held``; never an existing run by accident), the data (every class present, every image
    readable; on the device when it fits in memory), the empty exemplar memory and the result
    writer; with ``overwrite``, the old run's files are removed after all of them."""
    device = d.device
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    _check_precision(cfg.precision, device, say)
    if cfg.batch_size < d.world * cfg.accum_steps:
        raise ConfigError(f"batch_size {cfg.batch_size} is smaller than processes x "
                          f"accum_steps = {d.world * cfg.accum_steps}")
    out = Path(cfg.out)
    d.agree(lambda: _probe_out(out))
    d.agree(lambda: held.enter_context(lock_out(out, say)) and None)  # rank 0 writes OUT
    old_run = d.agree(lambda: clear_run(out, resume, overwrite))

    def load_data():
        try:
            return D.IncrementalData(cfg.dataset if dataset is None else dataset,
                                     cfg.init_cls, cfg.increment,
                                     root=cfg.data_root, download=cfg.download and d.main,
                                     seed=cfg.class_seed, max_train_per_class=cfg.train_per_class)
        except D.DataError as exc:
            raise ConfigError(str(exc)) from exc

    def check_data():  # before step 0, not at the step that first needs a missing class
        try:
            data.check_complete(cfg.test_per_class)
        except D.DataError as exc:
            raise ConfigError(str(exc)) from exc

    if cfg.download and d.active:  # rank 0 downloads first, then everyone reads
        d.agree(lambda: load_data() and None)
    data = d.agree_all(load_data)
    d.agree(check_data)
    if cfg.last_step is not None and cfg.last_step >= data.num_steps:
        raise ConfigError(f"last_step {cfg.last_step} is past the protocol's last step: "
                          f"{data.num_classes} classes in {data.num_steps} steps are steps "
                          f"0..{data.num_steps - 1}")
    memory = D.Memory(total=cfg.memory_total, per_class=cfg.memory_per_class)
    if cfg.memory_total is not None and cfg.memory_total < data.num_classes:
        raise ConfigError(f"memory_total {cfg.memory_total} is smaller than the number of "
                          f"classes ({data.num_classes})")
    side = data.info.image_size
    if ARCHS[cfg.backbone].feature_size(side) == 1 and \
            cfg.batch_size < 2 * d.world * cfg.accum_steps:
        # BatchNorm in training needs 2 values per channel: a 1-image micro-batch on a 1x1
        # map fails (a smaller last batch is dropped, see loop.train_epochs)
        raise ConfigError(f"backbone {cfg.backbone} reduces {side}x{side} images to a 1x1 "
                          "feature map, where BatchNorm needs at least 2 images per "
                          f"micro-batch: batch_size {cfg.batch_size} must be at least 2 x "
                          f"processes x accum_steps = {2 * d.world * cfg.accum_steps}")
    if data.dataset.in_memory and device.type == "cuda":
        data.dataset = data.dataset.to(device)
    holder = {}

    def make_outputs():  # rank 0 (checks --tensorboard); no object crosses processes
        holder["outputs"] = Outputs(out, cfg, True, say)

    d.agree(make_outputs)
    outputs = holder.get("outputs") or Outputs(out, cfg, False, say)
    d.agree(lambda: remove_run(out, old_run))  # --overwrite: every check passed
    return data, memory, outputs


def _check_position(out: Path, t: int, stage: int, memory: dict, data) -> None:
    """A checkpoint's position must lie within the run, its memory must match it: exactly the
    classes learnt before step t, each holding training images of its own class."""
    n = data.num_steps
    if t > n or (t == n and stage != 0):
        raise ConfigError(f"checkpoint {out / 'checkpoint.pt'} is past the last step: position "
                          f"step {t} stage {stage}, but this run has steps 0..{n - 1}")
    learnt = data.num_classes if t == n else data.num_old(t)
    where = f"checkpoint {out / 'checkpoint.pt'} is inconsistent: its memory"
    try:
        exemplars = {int(c): np.asarray(v, dtype=np.int64).reshape(-1)
                     for c, v in memory["exemplars"].items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where} entry is malformed: {exc}") from exc
    ahead = sorted(c for c in exemplars if not 0 <= c < learnt)
    if ahead:
        raise ConfigError(f"{where} holds classes {ahead[:10]} that step {t} has not reached")
    lacking = sorted(set(range(learnt)) - set(exemplars))
    if lacking:
        raise ConfigError(f"{where} lacks classes {lacking[:10]} learnt before step {t}")
    y = data.labels("train")
    for c, idx in exemplars.items():
        if len(idx) and (idx.min() < 0 or idx.max() >= len(y) or (y[idx] != c).any()):
            raise ConfigError(f"{where} files images under class {c} that are not training "
                              f"images of class {c}")


def _check_model(out: Path, model, t: int, stage: int, data) -> None:
    """The loaded model must be the one the checkpoint's position has: an extractor per step
    started (t, plus step t's own from stage 1 on), the protocol's task sizes, a classifier
    over all their features and the known classes, an auxiliary one over the newest
    extractor's features and its new classes + 1."""
    n_ext = t + stage
    sizes = [len(data.steps[i]) for i in range(n_ext)]
    problem = None
    if len(model.convnets) != n_ext:
        problem = f"{len(model.convnets)} extractors, position step {t} stage {stage} has {n_ext}"
    elif list(model.task_sizes) != sizes:
        problem = f"task sizes {list(model.task_sizes)}, the protocol's are {sizes}"
    else:
        k, last = sum(sizes), model.convnets[-1].out_dim
        for name, lin, want in (("fc", model.fc, (k, model.feature_dim)),
                                ("aux_fc", model.aux_fc, (sizes[-1] + 1, last))):
            if tuple(lin.weight.shape) != want or tuple(lin.bias.shape) != want[:1]:
                problem = (f"{name}.weight {tuple(lin.weight.shape)} / {name}.bias "
                           f"{tuple(lin.bias.shape)}, expected {want} / {want[:1]}")
                break
    if problem:
        raise ConfigError(f"checkpoint {out / 'checkpoint.pt'} is inconsistent: its model has "
                          f"{problem}")


def _incremental_steps(cfg, resume, say, d, data, memory, outputs) -> dict:
    """Every incremental step from the start or the checkpoint on; returns the metrics."""
    device, out = d.device, Path(cfg.out)
    torch.manual_seed(cfg.seed)
    Net = _model_class(cfg.impl)
    model = Net(cfg.backbone, in_channels=data.info.channels, use_masks=cfg.masks,
                mask_init=cfg.mask_init).to(device)
    metrics = {"config": asdict(cfg), "env": env_info(device, d), "class_order": data.order,
               "steps": [], "summary": {}}
    start_t, start_stage = 0, 0
    if resume:
        def load():
            state = load_ckpt(out, cfg)
            if state is None:
                raise ConfigError(f"--resume: no checkpoint in {out}")
            return state

        state = d.agree(load)
        start_t, start_stage = state["next"]
        _check_position(out, start_t, start_stage, state["memory"], data)
        if cfg.last_step is not None and start_t > cfg.last_step:
            # a run that stopped at the last_step it was given resumes as a no-op (as a
            # finished run does); any other last_step before its position is refused before
            # anything is written: a mistyped --last-step changes nothing
            reached = (start_t, start_stage) == (cfg.last_step + 1, 0) and \
                state["config"].get("last_step") == cfg.last_step
            if not reached:
                more = (f"; extend it with --last-step {start_t}..{data.num_steps - 1}"
                        if start_t < data.num_steps else "")
                raise ConfigError(f"last_step {cfg.last_step}: the run in {out} has already "
                                  f"finished step {start_t - 1}{more}")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"checkpoint {out / 'checkpoint.pt'}: its model does not load: "
                              f"{str(exc).splitlines()[0]}") from exc
        _check_model(out, model, start_t, start_stage, data)
        model.to(device)
        memory.load_state_dict(state["memory"])
        metrics["steps"] = state["steps"]
        partial = state.get("partial", {})
        saved_world = state.get("world_size", 1)
        if saved_world != d.world:
            say(f"warning: the checkpoint was written by {saved_world} process(es), this run "
                f"has {d.world}: BatchNorm sees other micro-batches, so the numbers will not "
                "match an uninterrupted run exactly")
        say(f"resuming {out} at step {start_t}, stage {start_stage}")
    else:
        partial = {}
    if d.main:
        write_json(out / "config.json", asdict(cfg))
    par = f", {d.world} processes ({d.backend})" if d.active else ""
    say(f"DER on {cfg.dataset} ({data.num_classes} classes, {data.num_steps} steps: "
        f"{cfg.init_cls or cfg.increment} + {cfg.increment}/step), backbone {cfg.backbone}, "
        f"impl {cfg.impl}, device {device}{par}"
        + ("" if cfg.last_step is None else f"; stopping after step {cfg.last_step}"))
    rt = Runtime(dist=d)

    def ckpt(next_t, next_stage, partial):
        if d.main:
            save_ckpt(out, {"config": asdict(cfg), "model": model.state_dict(),
                            "memory": memory.state_dict(), "steps": metrics["steps"],
                            "next": (next_t, next_stage), "partial": partial,
                            "version": __version__, "world_size": d.world})

    def check_stop(done):  # SIGTERM during pruning / herding / evaluation / the writes
        stop = d.stop_requested()
        if stop:
            raise Interrupted(stop, f"the end of {done}")

    hw = (data.info.image_size, data.info.image_size)
    end = data.num_steps if cfg.last_step is None else cfg.last_step + 1
    for t in range(start_t, end):
        n_old, n_known = data.num_old(t), data.num_known(t)
        stage = start_stage if t == start_t else 0
        rt.on_epoch = outputs.epoch({
            "train/loss_stage1": sum(cfg.schedule(s).epochs for s in range(t)),
            "train/loss_stage2": t * cfg.epochs_stage2})
        if stage == 0:
            partial = {}
            torch.manual_seed(cfg.seed * 1009 + t)
            model.update_fc(n_known)
            model.to(device)
            train_idx = np.concatenate([data.train_indices(t), memory.indices()])
            t0 = time.perf_counter()
            prev = metrics["steps"][-1] if metrics["steps"] else {}
            report = {}
            partial["loss_stage1"] = stage1(model, data, train_idx, cfg, t, n_old, device, rt,
                                            lambda_s0=prev.get("lambda_s"), report=report)
            partial["time_stage1_s"] = time.perf_counter() - t0
            if "params_unpruned" not in report:  # not pruned during stage 1
                report.update(unpruned_counts(model, hw))
            partial.update(report)
            if cfg.masks and cfg.prune:
                if model.convnets[-1].mask_e is not None:
                    t0 = time.perf_counter()
                    model.prune()
                    partial["time_prune_s"] = time.perf_counter() - t0
                partial["keep"] = (model.extractor_params()[-1]
                                   / partial["extractor_params_unpruned"][-1])
            stage = 1
            ckpt(t, 1, partial)
            check_stop(f"step {t} stage 1")
        if stage == 1:
            t0 = time.perf_counter()
            if t > 0 and cfg.stage2 == "retrain" and cfg.epochs_stage2 > 0:
                pool = np.concatenate([data.train_indices(t), memory.indices()])
                partial["loss_stage2"] = stage2(model, data, pool, cfg, t, device, rt)
            elif t > 0 and cfg.stage2 == "weight_align":
                partial["weight_align_gamma"] = model.weight_align(n_known - n_old)
            partial["time_stage2_s"] = time.perf_counter() - t0
            model.freeze_conv()

            def update_memory():  # rank 0 herds; the exemplars are broadcast
                memory.update(
                    lambda idx: extract(model, data, "train", idx, 2 * cfg.batch_size, device),
                    data.labels("train"), data.new_classes(t))
                return memory.state_dict()

            t0 = time.perf_counter()
            mem_state = d.agree(update_memory)
            if not d.main:
                memory.load_state_dict(mem_state)
            partial["time_memory_s"] = time.perf_counter() - t0

            row = d.agree(lambda: step_row(model, data, memory, cfg, t, device, hw, partial,
                                           metrics["steps"]))
            metrics["steps"].append(row)
            metrics["summary"] = summary(metrics["steps"])
            ckpt(t + 1, 0, {})  # first: metrics.json never runs ahead of the checkpoint
            outputs.step(metrics)
            say(format_table(metrics["steps"][-1:]) if t == 0 and not resume
                else format_table(metrics["steps"][-1:]).splitlines()[-1])
            if t + 1 < end:
                check_stop(f"step {t}")
    metrics["summary"] = summary(metrics["steps"])
    if d.main:
        write_json(out / "metrics.json", metrics)
    return metrics
