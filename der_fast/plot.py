"""Results to look at: ``metrics.csv`` and PNG plots of a run, and overlays of several runs.

The trainer calls :func:`write_run_outputs` at the end of every step (rank 0 only), which
writes into the run directory:

* ``metrics.csv``: one row per step (top-1/top-5, accuracy per task, parameters pruned and
  unpruned, losses, times, memory size);
* ``accuracy.png``: top-1 (and top-5) accuracy after each step, against the number of classes;
* ``params.png``: parameters after each step, pruned and unpruned (millions).

``python -m der_fast.plot DIR [DIR ...] [--out FILE.png]`` overlays several runs (labels from
the directory names) in one figure with both panels.

matplotlib (Agg backend, no display needed) is only needed for the PNGs; without it the CSV is
still written and the plots are skipped with a message.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["CSV_COLUMNS", "write_csv", "csv_text", "load_run", "plot_runs", "plot_accuracy",
           "plot_params", "write_run_outputs", "main"]

#: columns of metrics.csv, in this order (missing values are empty; lists joined with ';')
CSV_COLUMNS = ("step", "n_classes", "n_new", "top1", "top5", "per_task_top1", "nme_top1",
               "pycil_grouped_top1", "nme_pycil_grouped_top1", "params",
               "params_unpruned", "extractor_params", "extractor_params_unpruned",
               "keep", "lambda_s", "keep_trace", "macs", "macs_unpruned", "extractor_macs",
               "extractor_macs_unpruned", "memory_size", "n_test", "loss_stage1", "loss_stage2",
               "weight_align_gamma", "time_stage1_s", "time_prune_s", "time_stage2_s",
               "time_memory_s", "time_eval_s", "time_total_s")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ";".join(_cell(x) for x in v)
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def csv_text(metrics: dict) -> str:
    """metrics.json's steps as CSV text (header + one row per step)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in metrics.get("steps", []):
        w.writerow([_cell(s.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``; a failed write removes the temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv(metrics: dict, path) -> Path:
    path = Path(path)
    text = csv_text(metrics)
    _atomic(path, lambda p: p.write_text(text))
    return path


def load_run(path) -> dict:
    """metrics.json of a run directory (or the path of a metrics.json)."""
    p = Path(path)
    f = p / "metrics.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (is it a der_fast run directory?)")
    try:
        m = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f}: unreadable metrics.json: {exc}") from exc
    if not isinstance(m, dict) or "steps" not in m:
        raise ValueError(f"{f}: not a der_fast metrics.json (no 'steps')")
    problem = _steps_problem(m["steps"])
    if problem:
        raise ValueError(f"{f}: not a der_fast metrics.json ({problem})")
    return m


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _steps_problem(steps) -> Optional[str]:
    """What is wrong with metrics.json's ``steps`` for plotting (None if nothing): a list of
    objects with numbers ``n_classes`` and ``top1``, optional number ``top5`` and optional
    number lists ``extractor_params[_unpruned]`` / ``extractor_macs[_unpruned]``."""
    if not isinstance(steps, list):
        return f"'steps' must be a list, got {type(steps).__name__}"
    for i, s in enumerate(steps):
        if not isinstance(s, dict):
            return f"steps[{i}] must be an object"
        for k in ("n_classes", "top1"):
            if not _is_num(s.get(k)):
                return f"steps[{i}].{k} must be a number, got {s.get(k)!r}"
        if "top5" in s and not _is_num(s["top5"]):
            return f"steps[{i}].top5 must be a number, got {s['top5']!r}"
        for k in ("extractor_params", "extractor_params_unpruned", "extractor_macs",
                  "extractor_macs_unpruned"):
            if k in s and not (isinstance(s[k], list) and all(map(_is_num, s[k]))):
                return f"steps[{i}].{k} must be a list of numbers"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _labels(paths) -> list:
    """Run labels from directory names; parent folders are added while names collide."""
    parts = [Path(os.path.abspath(p)) for p in paths]
    parts = [p.parent if p.name == "metrics.json" else p for p in parts]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in parts):
            return labels
        depth += 1


def _accuracy_panel(ax, runs) -> None:
    for i, (label, m) in enumerate(runs):
        steps = m.get("steps", [])
        x = [s["n_classes"] for s in steps]
        color = f"C{i % 10}"
        ax.plot(x, [s["top1"] for s in steps], "o-", color=color, label=f"{label} top-1")
        if steps and all("top5" in s for s in steps):
            ax.plot(x, [s["top5"] for s in steps], "s--", color=color, label=f"{label} top-5")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy after each step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _cost_panel(ax, runs, key: str, ylabel: str, title: str) -> None:
    """Sum over extractors of ``key`` (``extractor_params`` / ``extractor_macs``), pruned and,
    where recorded, unpruned, in millions."""
    for i, (label, m) in enumerate(runs):
        steps = [s for s in m.get("steps", []) if key in s]
        x = [s["n_classes"] for s in steps]
        color = f"C{i % 10}"
        pruned = bool(steps) and all(f"{key}_unpruned" in s for s in steps)
        ax.plot(x, [sum(s[key]) / 1e6 for s in steps], "o-", color=color,
                label=f"{label} {'pruned' if pruned else ''}".strip())
        if pruned:
            ax.plot(x, [sum(s[f"{key}_unpruned"]) / 1e6 for s in steps], "x--", color=color,
                    label=f"{label} unpruned")
    ax.set_xlabel("classes seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _params_panel(ax, runs) -> None:
    _cost_panel(ax, runs, "extractor_params", "parameters (M)",
                "extractor parameters after each step")


def _macs_panel(ax, runs) -> None:
    _cost_panel(ax, runs, "extractor_macs", "MACs per image (M)",
                "super-feature extractor MACs")


def _save(fig, path: Path, plt) -> Path:
    path = Path(path)
    try:
        _atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def plot_accuracy(runs, path) -> Path:
    """``runs``: list of (label, metrics). One panel: accuracy per step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    _accuracy_panel(ax, runs)
    return _save(fig, path, plt)


def plot_params(runs, path) -> Path:
    """``runs``: list of (label, metrics). Two panels: extractor parameters and MACs per
    step."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    _params_panel(a, runs)
    _macs_panel(b, runs)
    return _save(fig, path, plt)


def plot_runs(runs, path) -> Path:
    """Both panels side by side for several runs (list of (label, metrics))."""
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(18, 4.5), layout="constrained")
    _accuracy_panel(a, runs)
    _params_panel(b, runs)
    _macs_panel(c, runs)
    return _save(fig, path, plt)


def write_run_outputs(out_dir, metrics: dict, plots: bool = True) -> Optional[str]:
    """Write metrics.csv (always) and accuracy.png / params.png (``plots`` and matplotlib
    available) into ``out_dir``. Returns a warning message when the plots were skipped
    because of matplotlib (missing or failing), else None."""
    out_dir = Path(out_dir)
    write_csv(metrics, out_dir / "metrics.csv")
    if not plots:
        return None
    try:
        _pyplot()
    except ImportError:
        return ("matplotlib is not installed: PNG plots skipped (metrics.csv written); "
                "pip install matplotlib")
    label = out_dir.resolve().name
    try:
        plot_accuracy([(label, metrics)], out_dir / "accuracy.png")
        plot_params([(label, metrics)], out_dir / "params.png")
    except Exception as exc:  # a plotting problem must never stop training
        return f"plots skipped: {type(exc).__name__}: {exc}"
    return None


#: what a run directory holds (the trainer's result files, its TensorBoard folder and lock):
#: a plot never writes over them (train.outputs.RESULT_FILES is a subset, checked there)
RUN_FILES = ("checkpoint.pt", "metrics.json", "metrics.csv", "config.json", "accuracy.png",
             "params.png", "tensorboard", ".lock")
_RUN_MARKS = ("checkpoint.pt", "metrics.json", "config.json", ".lock")  # "this holds a run"


def _owned_by_a_run(path, runs) -> Optional[Path]:
    """The run directory whose own file (or folder, or their ``.tmp`` versions) writing
    ``path`` would replace: in one of ``runs`` (directories or metrics.json paths) or in any
    directory that holds a der_fast run; None if it is none's."""
    p = Path(os.path.abspath(path))
    target = p.parent.resolve() / p.name  # a file is replaced by name (os.replace)
    homes = {Path(os.path.abspath(r)).resolve() for r in runs}
    homes |= {h.parent for h in homes if h.name == "metrics.json"}
    for home in target.parents:
        if home in homes or any((home / m).exists() for m in _RUN_MARKS):
            first = target.relative_to(home).parts[0]
            if first.removesuffix(".tmp") in RUN_FILES:
                return home
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m der_fast.plot",
        description="Overlay der_fast runs: accuracy and parameters after each step "
                    "(labels from the directory names).")
    p.add_argument("runs", nargs="+", metavar="DIR", help="run directories (with metrics.json)")
    p.add_argument("--out", default="der_runs.png", help="output PNG (der_runs.png)")
    p.add_argument("--csv", metavar="FILE", help="also write all runs' steps to one CSV")
    args = p.parse_args(argv)
    for flag, path in (("--out", args.out), ("--csv", args.csv)):
        home = _owned_by_a_run(path, args.runs) if path else None
        if home is not None:
            print(f"error: {flag} {path} would replace a file of the run in {home}; write the "
                  "plot elsewhere or under another name (e.g. DIR/compare.png)", file=sys.stderr)
            return 2
    if args.csv and Path(args.csv).resolve() == Path(args.out).resolve():
        print(f"error: --out and --csv name the same file {args.out}", file=sys.stderr)
        return 2
    try:
        runs = [load_run(d) for d in args.runs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = _labels(args.runs)
    try:
        out = plot_runs(list(zip(labels, runs)), args.out)
    except ImportError:
        print("error: matplotlib is needed for plots: pip install matplotlib", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("run",) + CSV_COLUMNS)
        for label, m in zip(labels, runs):
            for s in m.get("steps", []):
                w.writerow([label] + [_cell(s.get(c)) for c in CSV_COLUMNS])
        try:
            _atomic(Path(args.csv), lambda p: p.write_text(buf.getvalue()))
        except OSError as exc:
            print(f"error: cannot write {args.csv}: {exc}", file=sys.stderr)
            return 2
    for label, m in zip(labels, runs):
        s = m.get("summary")
        if isinstance(s, dict) and all(_is_num(s.get(k, 0)) for k in
                                       ("avg_incremental_top1", "last_top1", "final_params")):
            print(f"{label}: average incremental top-1 {s.get('avg_incremental_top1', 0):.2f}, "
                  f"last {s.get('last_top1', 0):.2f}, final params {s.get('final_params', 0):,}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
