"""Mutation check: apply each deliberate bug (a patch in this folder) to a throwaway copy of
der_fast, run the tests meant to catch it, and report which were caught.

Usage (from anywhere; the repository is found from this file's location)::

    python tests/mutants/run_mutants.py              # baseline, then every mutant
    python tests/mutants/run_mutants.py --list       # the mutants, their bugs and tests
    python tests/mutants/run_mutants.py --only 07    # one mutant (name, number or substring;
                                                     # repeat --only for several)
    python tests/mutants/run_mutants.py --no-baseline --timeout 300 --keep

Exit status: 0 when every mutant run was caught; 1 when any survived, timed out or could
not be run (patch failed, no tests collected); 2 when the set-up or the baseline failed.

The patches (``NN_short_name.patch``) are unified diffs against the repository root (paths
``a/der_fast/...``); ``patch -p1`` and ``git apply`` both take them. Lines before the diff are
the header, ignored by both tools:

    # mutant: what the bug is (one or more lines)
    # tests: a pytest node id or file (one per line; run in this order)

How a mutant runs. The tests import the *installed* der_fast (tests/conftest.py moves the
repository root to the end of sys.path so that the compiled extension is used), so a patch
to the checkout would never be seen. Instead, per mutant:

1. an overlay root is made in a temporary folder: ``<root>/der_fast`` is a real copy of the
   checkout's der_fast/ (Python only), with the compiled files of the installed package
   copied in (``_C*.so``, ``_build_info.py``) and ``der_fast/kernels`` a link to the
   checkout's kernels/ (installed, kernels/ is the subpackage der_fast.kernels);
2. the patch is applied there (``patch -p1`` in ``<root>``);
3. ``python -m pytest <tests> -x -q -p no:cacheprovider`` runs from an empty temporary
   working directory with ``PYTHONPATH=<root>`` (ahead of site-packages, and conftest.py
   only moves the repository root, so the overlay wins; subprocesses started by the tests
   inherit it) and ``OMP_NUM_THREADS=1``, under a per-mutant timeout. A small pytest plugin
   written into the overlay (``-p _mutant_overlay_guard``) fails the session if the der_fast
   the tests imported is not the overlay's or was loaded without its compiled extension.

Before the mutants, the overlay is checked (``import der_fast`` with that PYTHONPATH imports
the overlay, with der_fast._C) and the *unpatched* overlay must pass every test the chosen
mutants use (the baseline; ``--no-baseline`` skips it). A mutant is "caught" when pytest
reports failed tests (exit status 1) or an error while collecting them (2, e.g. the mutant
broke an import); "survived" when its tests pass. Nothing in the checkout is modified.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = sys.executable

GUARD = '''\
"""pytest plugin written by run_mutants.py: the tests must run against the overlay."""
import os
import sys


def pytest_collection_finish(session):
    import pytest

    root = os.environ["DER_FAST_MUTANT_OVERLAY"]
    mod = sys.modules.get("der_fast")
    if mod is None:
        import der_fast as mod
    where = os.path.realpath(mod.__file__)
    if not where.startswith(os.path.realpath(root) + os.sep):
        pytest.exit(f"run_mutants: the tests imported der_fast from {where}, not from the "
                    f"overlay {root}", returncode=99)
    from der_fast import ops
    if not ops.HAS_CPU_EXT:
        pytest.exit(f"run_mutants: the overlay's der_fast._C did not load: "
                    f"{ops.CPU_EXT_ERROR}", returncode=99)
'''


@dataclass
class Mutant:
    name: str
    path: Path
    description: str
    tests: list = field(default_factory=list)


def load_mutants() -> list:
    out = []
    for p in sorted(HERE.glob("*.patch")):
        desc, tests = [], []
        for line in p.read_text().splitlines():
            if line.startswith(("--- ", "diff ")):
                break
            if line.startswith("# mutant:"):
                desc.append(line[len("# mutant:"):].strip())
            elif line.startswith("# tests:"):
                tests.append(line[len("# tests:"):].strip())
        if not tests:
            raise SystemExit(f"{p.name}: no '# tests:' line in its header")
        out.append(Mutant(p.stem, p, " ".join(desc), tests))
    return out


def select(mutants: list, only: list) -> list:
    if not only:
        return mutants
    chosen = []
    for key in only:
        hits = [m for m in mutants if m.name == key] or \
               [m for m in mutants if m.name.split("_", 1)[0] == key] or \
               [m for m in mutants if key in m.name]
        if not hits:
            raise SystemExit(f"--only {key!r}: no mutant matches; see --list")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def installed_package_dir() -> Path:
    """The installed der_fast (imported from /tmp, so that no checkout on sys.path wins)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([PYTHON, "-c", "import der_fast, os; "
                          "print(os.path.dirname(os.path.realpath(der_fast.__file__)))"],
                         cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cannot import the installed der_fast:\n{res.stderr}")
    d = Path(res.stdout.strip().splitlines()[-1])
    if d.resolve() == (REPO / "der_fast").resolve():
        raise SystemExit(f"der_fast imports from the checkout ({d}), not an installed copy")
    return d


def make_overlay(installed: Path, parent: Path) -> Path:
    """<parent>/overlay/der_fast: the checkout's Python files + the installed compiled ones."""
    root = parent / "overlay"
    pkg = root / "der_fast"
    shutil.copytree(REPO / "der_fast", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "kernels"))
    compiled = sorted(installed.glob("*.so")) + [installed / "_build_info.py"]
    for f in compiled:
        if not f.is_file():
            raise SystemExit(f"installed package lacks {f.name}")
        shutil.copy2(f, pkg / f.name)
    (pkg / "kernels").symlink_to(REPO / "kernels", target_is_directory=True)
    (root / "_mutant_overlay_guard.py").write_text(GUARD)
    return root


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["OMP_NUM_THREADS"] = "1"
    env["DER_FAST_MUTANT_OVERLAY"] = str(root)
    return env


def check_overlay(root: Path, cwd: Path) -> str:
    res = subprocess.run(
        [PYTHON, "-c", "import der_fast, os; from der_fast import ops; "
         "print(os.path.realpath(der_fast.__file__)); print(ops.HAS_CPU_EXT)"],
        cwd=cwd, env=env_for(root), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the overlay does not import:\n{res.stderr}")
    where, has_ext = res.stdout.split()[-2:]
    if not where.startswith(str(root.resolve()) + os.sep):
        raise SystemExit(f"PYTHONPATH={root}: der_fast imports from {where}, not the overlay")
    if has_ext != "True":
        raise SystemExit("the overlay's der_fast._C does not load")
    return where


def apply_patch(root: Path, patch: Path) -> tuple:
    res = subprocess.run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
                          "-s", "-i", str(patch)], cwd=root, capture_output=True, text=True)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


_SUMMARY = re.compile(r"(\d+) (failed|passed|errors?|skipped|deselected|xfailed|xpassed)")


def run_tests(root: Path, tests: list, cwd: Path, timeout: float) -> tuple:
    """-> (status, pytest exit code or None, summary, seconds, output tail)."""
    args = [PYTHON, "-m", "pytest", *[str(REPO / t) for t in tests], "-x", "-q",
            "-p", "no:cacheprovider", "-p", "_mutant_overlay_guard"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(args, cwd=cwd, env=env_for(root), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return "timeout", None, f"> {timeout:.0f} s", time.perf_counter() - t0, out[-3000:]
    secs = time.perf_counter() - t0
    out = res.stdout + res.stderr
    counts = {}
    for line in reversed(out.splitlines()):
        found = _SUMMARY.findall(line)
        if found and (" in " in line or "no tests ran" in line):
            counts = {k: int(n) for n, k in found}
            break
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "?"
    status = {0: "passed", 1: "failed", 2: "error"}.get(res.returncode, f"rc{res.returncode}")
    if res.returncode == 99:
        status = "guard"  # the overlay was not the package imported (see GUARD)
    return status, res.returncode, summary, secs, out[-3000:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this mutant (full name, its number, or a substring); "
                         "may be repeated")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds per pytest run (default 600)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the unpatched overlay's tests first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary overlays")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print pytest's output tail for every run")
    args = ap.parse_args(argv)

    mutants = select(load_mutants(), args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    bug:   {m.description}")
            for t in m.tests:
                print(f"    test:  {t}")
        return 0

    t_start = time.perf_counter()
    installed = installed_package_dir()
    work = Path(tempfile.mkdtemp(prefix="der_fast_mutants_"))
    print(f"installed der_fast: {installed}\nwork dir: {work}", flush=True)
    try:
        # ------------------------------------------------------------ overlay + baseline
        base = make_overlay(installed, work / "baseline")
        cwd = work / "cwd"
        cwd.mkdir()
        print(f"overlay check: der_fast imports from {check_overlay(base, cwd)}", flush=True)
        if not args.no_baseline:
            tests = []
            for m in mutants:
                tests += [t for t in m.tests if t not in tests]
            print(f"baseline: {len(tests)} test selections on the unpatched overlay ...",
                  flush=True)
            status, rc, summary, secs, out = run_tests(base, tests, cwd, args.timeout * 2)
            print(f"baseline: {status} ({summary}) in {secs:.1f} s", flush=True)
            if status != "passed":
                print(out)
                print("the unpatched overlay fails its tests: no mutant can be judged")
                return 2

        # ------------------------------------------------------------ mutants
        rows = []
        for i, m in enumerate(mutants):
            mdir = work / f"m{i:02d}"
            root = make_overlay(installed, mdir)
            ok, msg = apply_patch(root, m.path)
            if not ok:
                rows.append((m, "patch failed", "", 0.0))
                print(f"[{m.name}] patch failed:\n{msg}", flush=True)
                continue
            status, rc, summary, secs, out = run_tests(root, m.tests, cwd, args.timeout)
            verdict = {"failed": "CAUGHT", "error": "CAUGHT (collection error)",
                       "passed": "SURVIVED", "timeout": "TIMEOUT"}.get(status, status.upper())
            rows.append((m, verdict, summary, secs))
            print(f"[{m.name}] {verdict} ({summary}) in {secs:.1f} s", flush=True)
            if args.verbose or verdict not in ("CAUGHT", "SURVIVED"):
                print("    " + out.replace("\n", "\n    ")[-2500:], flush=True)
            if not args.keep:
                shutil.rmtree(mdir, ignore_errors=True)

        # ------------------------------------------------------------ report
        print("\n| mutant | bug | tests | result | pytest | seconds |")
        print("|---|---|---|---|---|---|")
        for m, verdict, summary, secs in rows:
            tests = "<br>".join(t.replace("tests/", "") for t in m.tests)
            print(f"| {m.name} | {m.description} | {tests} | {verdict} | {summary} | "
                  f"{secs:.1f} |")
        caught = sum(v.startswith("CAUGHT") for _, v, _, _ in rows)
        print(f"\n{caught}/{len(rows)} mutants caught; total {time.perf_counter() - t_start:.0f} s")
        bad = [m.name for m, v, _, _ in rows if not v.startswith("CAUGHT")]
        if bad:
            print("not caught: " + ", ".join(bad))
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"overlays kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
