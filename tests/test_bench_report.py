"""The benchmark report's parsing and ratio math (synthetic pytest-benchmark JSON), and the
equivalence check that benchmarks/bench_model.py runs before timing, on a tiny case of every
provider."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.harness import report as R


# ============================================================================ synthetic JSON
def _bench(provider, workload, t, density, median, q1, q3, backbone="resnet32", batch=128,
           hw=32, peak=None, params=None, **extra):
    ex = {"provider": provider, "workload": workload, "backbone": backbone, "t": t,
          "density": density, "batch": batch, "hw": hw, "device": "cpu",
          "device_name": "Test CPU", "torch": "2.14.1", "der_fast": "0.1.0", "grid": "quick",
          "threads": 1}
    if peak is not None:
        ex["peak_mem_bytes"] = peak
    if params is not None:
        ex["params"] = params
    ex.update(extra)
    return {"group": f"{workload}-{backbone}-t{t}", "name": f"test_model[{provider}]",
            "extra_info": ex,
            "stats": {"min": q1 * 0.9, "max": q3 * 1.1, "mean": median, "stddev": 0.01,
                      "median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "rounds": 5}}


def synthetic() -> dict:
    b = [
        # stage 1, t=5: fast 0.05 s, reference 0.20 s, func 0.60 s (no floor of its own)
        _bench("fast", "stage1", 5, 0.3, 0.05, 0.04, 0.06, params=600_000, plan="loop"),
        _bench("reference", "stage1", 5, 0.3, 0.20, 0.18, 0.22, peak=3 * 2 ** 20),
        _bench("func", "stage1", 5, 0.3, 0.60, 0.50, 0.70),
        _bench("fast_grouped", "stage1", 5, 0.3, 0.08, 0.07, 0.09,
               floor_interleaved_s={"median": 0.04, "min": 0.02, "rounds": 5}),
        # floors
        _bench("fast", "floor", 1, None, 0.02, 0.02, 0.02),
        _bench("reference", "floor", 1, None, 0.25, 0.24, 0.26),
        # inference without a fast measurement: no ratio row
        _bench("reference", "infer", 5, 0.3, 0.10, 0.09, 0.11),
        # stage 2 at two densities, unordered
        _bench("reference", "stage2", 2, 1.0, 0.03, 0.03, 0.03),
        _bench("fast", "stage2", 2, 1.0, 0.01, 0.01, 0.01),
        _bench("fast", "stage2", 2, 0.3, 0.02, 0.02, 0.02),
        _bench("compile", "stage2", 2, 0.3, 0.01, 0.008, 0.012, compile_s=42.0),
    ]
    # a per-op benchmark of another suite (no workload): ignored by the report
    b.append({"group": "masked_gate fwd", "name": "test_masked_gate[op]",
              "extra_info": {"op": "masked_gate", "provider": "op"},
              "stats": {"median": 1.0, "q1": 1.0, "q3": 1.0, "mean": 1.0, "rounds": 3}})
    return {"datetime": "2026-11-25T00:00:00", "machine_info": {"python_version": "3.11.7"},
            "benchmarks": b,
            "der_fast": {"env": {"device": "cpu", "device_name": "Test CPU", "torch": "2.14.1",
                                 "der_fast": "0.1.0", "grid": "quick", "threads": 1},
                         "skipped": [{"case": "stage1-resnet32-b128-t5-d30",
                                      "provider": "fast_grouped",
                                      "reason": "FastDERNet rejects the plan"}],
                         "failed_checks": [{"case": "floor-resnet18_cifar-b16-t1--",
                                            "provider": "fast",
                                            "reason": "1 of 76 outputs/gradients fail\n  x"}],
                         "memory": "tensor bytes"}}


def test_load_ignores_foreign_benchmarks():
    results, _ = R.load(synthetic())
    assert len(results) == 11
    assert {r.provider for r in results} == {"fast", "reference", "func", "compile",
                                             "fast_grouped"}
    r = next(r for r in results if r.provider == "fast" and r.workload == "floor")
    assert r.density is None and r.t == 1 and r.median == pytest.approx(0.02)


def test_speedup_is_other_over_fast_with_quartile_spread():
    results, _ = R.load(synthetic())
    ref = next(r for r in results if r.provider == "reference" and r.workload == "stage1")
    fast = next(r for r in results if r.provider == "fast" and r.workload == "stage1")
    ratio, lo, hi = R.speedup(ref, fast)
    assert ratio == pytest.approx(0.20 / 0.05)  # 4x: fast is four times faster
    assert lo == pytest.approx(0.18 / 0.06)  # other q1 / fast q3
    assert hi == pytest.approx(0.22 / 0.04)  # other q3 / fast q1
    assert lo <= ratio <= hi


def test_ratio_table_rows_and_order():
    results, _ = R.load(synthetic())
    rows = R.ratio_table(results)
    keys = [k for k, _, _ in rows]
    # infer has no fast measurement -> no row; order: stage1, then stage2 by density desc
    assert [k[0] for k in keys] == ["stage1", "stage2", "stage2", "floor"]
    assert [k[5] for k in keys[1:3]] == [1.0, 0.3]
    stage1 = dict((k, c) for k, _, c in rows)[keys[0]]
    assert stage1["reference"][0] == pytest.approx(4.0)
    assert stage1["func"][0] == pytest.approx(12.0)
    s2_30 = rows[2][2]
    assert s2_30 == {"compile": pytest.approx((0.5, 0.4, 0.6))}
    floor = rows[3][2]
    assert floor["reference"][0] == pytest.approx(12.5)
    # another baseline provider
    rows_ref = {k[0]: c for k, _, c in R.ratio_table(results, fast="reference")}
    assert rows_ref["infer"] == {}  # only the reference measured it
    assert rows_ref["stage1"]["fast"][0] == pytest.approx(0.05 / 0.20)


def test_floor_share_uses_own_floor_else_reference():
    results, _ = R.load(synthetic())
    rows = R.floor_shares(results)
    assert len(rows) == 1
    key, cells = rows[0]
    assert key[0] == "stage1"
    assert cells["fast"] == (pytest.approx(0.05 / 0.02), "fast")
    assert cells["reference"] == (pytest.approx(0.20 / 0.25), "reference")
    assert cells["func"] == (pytest.approx(0.60 / 0.25), "reference")  # no func floor
    # a floor timed between the rounds of the case wins over the separate floor cases
    assert cells["fast_grouped"] == (pytest.approx(0.08 / 0.04), "interleaved")
    _, cells_min = R.floor_shares(R.load(synthetic(), stat="min")[0], stat="min")[0]
    assert cells_min["fast_grouped"] == (pytest.approx(0.07 * 0.9 / 0.02), "interleaved")


def test_several_files_are_merged(tmp_path):
    data = synthetic()
    a, b = dict(data), dict(data)
    a["benchmarks"], b["benchmarks"] = data["benchmarks"][:5], data["benchmarks"][5:]
    b["der_fast"] = {"skipped": [{"case": "x", "provider": "compile", "reason": "later run"}]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    merged, meta = R.load([str(pa), str(pb)])
    whole, _ = R.load(data)
    assert sorted(map(repr, merged)) == sorted(map(repr, whole))
    assert [s["reason"] for s in meta["der_fast"]["skipped"]] == [
        "FastDERNet rejects the plan", "later run"]
    assert R.ratio_table(merged) == R.ratio_table(whole)


def test_min_statistic():
    results, _ = R.load(synthetic(), stat="min")
    ref = next(r for r in results if r.provider == "reference" and r.workload == "stage1")
    fast = next(r for r in results if r.provider == "fast" and r.workload == "stage1")
    assert (ref.median, ref.q1, ref.q3) == pytest.approx((0.18 * 0.9, 0.18 * 0.9, 0.20))
    ratio, lo, hi = R.speedup(ref, fast)
    assert ratio == pytest.approx(0.162 / 0.036)
    assert lo == pytest.approx(0.162 / 0.05) and hi == pytest.approx(0.20 / 0.036)
    with pytest.raises(ValueError):
        R.load(synthetic(), stat="mean")


def test_format_report_and_cli(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(synthetic()))
    out = tmp_path / "report.md"
    assert R.main([str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.strip() == out.read_text().strip()
    assert "4.00x (3.00-5.50)" in text  # reference / fast, stage 1
    assert "| stage1 | resnet32 b128 32px | 5 | 30% | 50.0 ms |" in text
    # floor shares: own floor case (†), the reference's (*), interleaved (no mark)
    assert "2.50†" in text and "2.40*" in text and "| 2.00 |" in text
    assert "FastDERNet rejects the plan" in text  # skipped cases with their reason
    assert "Failed the equivalence check" in text and "1 of 76 outputs" in text
    assert "42.0 s" in text  # compile time
    assert "| 3.0 |" in text  # 3 MiB peak memory
    assert "600,000" in text  # parameters
    assert "Test CPU" in text


def test_summary_table_at_the_end_of_a_run():
    """The table benchmarks/conftest.py prints after a run: per case the median of every
    provider, its speedup over the reference (b) and over torch.compile (c), and the compile
    time."""
    results, _ = R.load(synthetic())
    lines = R.format_summary(results).splitlines()
    assert "speedup over reference" in lines[0] and "over compile" in lines[0]
    head = lines[1].split()
    assert head == ["workload", "backbone", "t", "density", "reference", "ms", "compile", "ms",
                    "fast", "ms", "fast_grouped", "ms", "func", "ms", "compile", "s"]
    assert set(lines[2]) == {"-"}
    rows = {tuple(r.split()[:6]): r for r in lines[3:]}  # workload, backbone (3), t, density
    assert list(rows) == [("infer", "resnet32", "b128", "32px", "5", "30%"),
                          ("stage1", "resnet32", "b128", "32px", "5", "30%"),
                          ("stage2", "resnet32", "b128", "32px", "2", "100%"),
                          ("stage2", "resnet32", "b128", "32px", "2", "30%"),
                          ("floor", "resnet32", "b128", "32px", "1", "-")]
    # stage 1, t = 5: fast 50 ms = 4x faster than the reference's 200 ms, func 3x slower
    stage1 = rows["stage1", "resnet32", "b128", "32px", "5", "30%"]
    assert "50.0 [b 4.00]" in stage1 and "600 [b 0.33]" in stage1
    assert stage1.split()[6:8] == ["200", "-"]  # the reference: no ratio to itself
    # stage 2 at 30 %: no reference; fast's 20 ms is half as fast as compile's 10 ms, which
    # took 42 s to compile
    s2 = rows["stage2", "resnet32", "b128", "32px", "2", "30%"]
    assert s2.split()[6:8] == ["-", "10.0"]
    assert "20.0 [c 0.50]" in s2 and s2.rstrip().endswith("42.0") and "[b" not in s2
    assert rows["infer", "resnet32", "b128", "32px", "5", "30%"].split()[6:] == \
        ["100"] + ["-"] * 5
    assert R.format_summary([]) == ""


def test_cli_bad_file(tmp_path, capsys):
    assert R.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ============================================================================ equivalence
@pytest.fixture(scope="module")
def C():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared 2-core CPU: one thread is faster
    from benchmarks import harness

    yield harness
    torch.set_num_threads(n)


TINY = [("infer", 1), ("stage1", 1), ("infer", 2), ("stage1", 2), ("stage2", 2)]
PROVIDERS = ["reference_cl", "func", "fast", "fast_loop", "fast_grouped",
             pytest.param("compile", marks=[
                 pytest.mark.slow,
                 pytest.mark.skipif(os.environ.get("DER_FAST_TEST_COMPILE") != "1",
                                    reason="torch.compile takes about a minute per case on a "
                                           "2-core CPU: set DER_FAST_TEST_COMPILE=1")])]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload,t", TINY)
def test_provider_matches_reference(C, workload, t, provider):
    """The check bench_model.py runs before timing: logits (and aux logits, loss and every
    trainable gradient for training workloads) equal the reference's on a tiny case
    (resnet32, batch 2, 16x16; t=2 has a pruned frozen extractor), judged against the
    float64 reference: error <= 2 x the float32 reference's own error + 1e-4 x max|value|."""
    case = C.Case(workload, "resnet32", t, 0.3, 2, 16)
    try:
        wl, info = C.prepare(case, provider, torch.device("cpu"), grid_skips=False)
    except C.ProviderUnavailable as exc:  # every listed provider must exist: never hide it
        pytest.fail(f"provider {provider} unavailable: {exc}")
    # prepare() raised if it differed; the errors it measured are recorded with the result
    assert info["check_max_rel_err"] <= 2 * info["check_ref32_rel_err"] + 1e-4
    out = wl.step()  # and it runs as timed
    assert torch.isfinite(out).all()


def test_check_catches_a_wrong_provider(C):
    """A provider that computes something else fails the check (a fast wrong answer is not a
    result)."""
    case = C.Case("infer", "resnet32", 2, 0.3, 2, 16)
    ref = C.reference_outputs(case, torch.device("cpu"))
    built = C.build_provider("reference", C.reference_model(case), torch.device("cpu"))
    with torch.no_grad():
        built.model.convnets[0].stages[1][0].conv1.weight.mul_(1.01)
    got = C.Workload(case, built, torch.device("cpu")).check_outputs()
    with pytest.raises(AssertionError, match="logits"):
        C.compare(ref, got)


def test_func_ensemble_pads_pruned_extractors(C):
    """The torch.func provider stacks pruned extractors of different widths (zero-padded to
    full width with binary gates) and gathers their features back in the right columns."""
    case = C.Case("infer", "resnet32", 3, 0.3, 2, 16)
    model = C.reference_model(case)
    widths = {n.out_dim for n in model.convnets}
    assert max(widths) < 64  # pruned to ~30%
    ens = C.FuncEnsemble(model)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ens(x)["features"], model(x)["features"], rtol=1e-4,
                                   atol=1e-5)
