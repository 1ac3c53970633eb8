"""benchmarks/compile_grid.py's table: medians, ratios, compile times, and providers that were
skipped or timed although they failed the equivalence check (--time-failing)."""

import numpy as np

from helpers import load_benchmark

grid = load_benchmark("compile_grid")


def _timing(rng, median):
    q = np.sort(rng.uniform(0.9, 1.1, 2)) * median
    return {"median": median, "q1": float(q[0]), "q3": float(q[1])}


def test_table_marks_failed_checks_and_gives_ratios():
    rng = np.random.default_rng(3)
    env = {"device_name": "cpu", "torch": "x", "der_fast": "y", "threads": 1,
           "compile_threads": 1}
    ref, comp, fast = (float(v) for v in rng.uniform(0.5, 2.0, 3))
    failing = {"workload": "stage1", "backbone": "resnet32", "t": 10, "density": 0.3,
               "batch": 128, "hw": 32}
    recs = [{"case": failing, "rounds": 5, "env": env, "providers": {
        "reference": _timing(rng, ref),
        "compile": dict(_timing(rng, comp), compile_s=400.0,
                        check_failed="2 of 117 outputs/gradients fail the equivalence check"),
        "fast": _timing(rng, fast)}},
        {"case": dict(failing, workload="infer"), "rounds": 5, "env": env, "providers": {
            "reference": _timing(rng, ref), "compile": {"skipped": "no compiler"},
            "fast": _timing(rng, fast)}}]
    text = grid.markdown(recs)
    row = next(line for line in text.splitlines() if line.startswith("| stage1"))
    assert f"{comp * 1e3:.0f} ±" in row and "(!)" in row
    assert f"{comp / fast:.2f}x" in row and f"{ref / fast:.2f}x" in row and "400.0" in row
    assert "failed the equivalence check" in text and "2 of 117" in text
    assert "Skipped:" in text and "no compiler" in text
    infer = next(line for line in text.splitlines() if line.startswith("| infer"))
    assert "(!)" not in infer and "skipped" in infer
