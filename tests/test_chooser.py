"""The measured frozen plan (der_fast.fast.chooser) under an injected timer, and the CUDA
graphs of the frozen path (der_fast.fast.graphs; GPU-marked, skipped without a GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from der_fast.fast import FastDERNet, chooser
from der_fast.fast import graphs as G
from helpers import make_ref

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTimer:
    """Runs each call (so outputs are real) and reports the preset seconds per candidate."""

    def __init__(self, seconds: dict, default: float = 1.0):
        self.seconds, self.default, self.calls = seconds, default, []

    def __call__(self, name, call):
        call()
        self.calls.append(name)
        return self.seconds.get(name, self.default)


@pytest.fixture
def fresh(monkeypatch):
    """An empty process-wide choice cache; returns a function installing a fake timer."""
    monkeypatch.setattr(chooser, "CHOICES", {})

    def install(seconds, default=1.0):
        timer = FakeTimer(seconds, default)
        monkeypatch.setattr(chooser, "TIMER", timer)
        return timer

    return install


def _model(t=3, prune=(0,), seed=0, device="cpu"):
    ref = make_ref("resnet32", t, prune=prune, seed=seed).eval().to(device)
    return ref, FastDERNet.from_reference(ref, frozen_plan="measure").eval()


def _x(n=4, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(device)


def _check_matches_reference(ref, fast, x):
    with torch.no_grad():
        want, got = ref(x), fast(x)
    for k in ("logits", "aux_logits", "features"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fastest", ["loop", "grouped", "direct"])
def test_picks_the_fastest_and_matches_the_reference(fresh, fastest):
    ref, fast = _model()
    x = _x()
    candidates = fast._frozen_candidates(fast._frozen_folded(list(fast.convnets)), x)
    if fastest not in candidates:
        pytest.skip(f"{fastest} cannot run here")
    timer = fresh({fastest: 0.001})
    _check_matches_reference(ref, fast, x)
    choice = fast.plan()["frozen_choice"]
    assert choice["chosen"] == fastest, choice
    assert set(choice["timings_ms"]) == set(candidates)
    assert set(timer.calls) == set(candidates)
    assert fast.plan()["frozen_last_run"][0] == fastest
    # a cache hit runs the winner, again equal to the reference
    _check_matches_reference(ref, fast, x)


def test_drops_a_candidate_whose_output_differs(fresh, monkeypatch):
    ref, fast = _model()
    real = FastDERNet._frozen_candidates

    def with_broken(self, folded, x):
        cands = real(self, folded, x)
        loop = cands["loop"]
        cands["broken"] = lambda xx: loop(xx) * 1.01
        cands["crashes"] = lambda xx: 1 / 0
        return cands

    monkeypatch.setattr(FastDERNet, "_frozen_candidates", with_broken)
    timer = fresh({"broken": 1e-6, "crashes": 1e-6, "grouped": 0.5})
    x = _x()
    with pytest.warns(RuntimeWarning, match="'broken' dropped"):
        _check_matches_reference(ref, fast, x)
    choice = fast.plan()["frozen_choice"]
    assert set(choice["dropped"]) == {"broken", "crashes"}
    assert "differs" in choice["dropped"]["broken"]
    assert choice["chosen"] == "grouped"
    assert "broken" not in timer.calls and "crashes" not in timer.calls


def test_caches_per_key_and_rechooses_on_change(fresh):
    ref, fast = _model()
    timer = fresh({"loop": 0.001})
    x = _x()
    _check_matches_reference(ref, fast, x)
    n = len(timer.calls)
    assert n > 0
    _check_matches_reference(ref, fast, x)
    # another model of the same structure in the same process: cached too
    _, twin = _model(seed=0)
    with torch.no_grad():
        twin(x)
    assert len(timer.calls) == n
    # another batch shape: measured again
    _check_matches_reference(ref, fast, _x(n=3))
    assert len(timer.calls) > n
    n = len(timer.calls)
    # another extractor: measured again (now 4 frozen extractors)
    ref4, fast4 = _model(t=4)
    _check_matches_reference(ref4, fast4, x)
    assert len(timer.calls) > n
    n = len(timer.calls)
    # other widths (another extractor pruned), same number of extractors: measured again
    ref_p, fast_p = _model(t=3, prune=(0, 1))
    _check_matches_reference(ref_p, fast_p, x)
    assert len(timer.calls) > n


def test_winner_follows_the_timer_per_key(fresh):
    ref, fast = _model()
    fresh({"grouped": 0.001})
    _check_matches_reference(ref, fast, _x(n=4))
    assert fast.plan()["frozen_choice"]["chosen"] == "grouped"
    fresh({"loop": 0.001})
    _check_matches_reference(ref, fast, _x(n=2))
    assert fast.plan()["frozen_choice"]["chosen"] == "loop"
    _check_matches_reference(ref, fast, _x(n=4))  # the first key's choice is kept
    assert fast.plan()["frozen_choice"]["chosen"] == "grouped"


def test_timing_stops_early():
    x = torch.randn(2, 3)
    cands = {"loop": lambda xx: xx * 2, "slow": lambda xx: xx + xx}
    timer = FakeTimer({"loop": 0.001, "slow": 1.0})
    choice, out = chooser.choose(("k",), cands, x, timer=timer, cache={})
    assert choice.chosen == "loop" and torch.equal(out, x * 2)
    # the loser is timed once (>= GIVE_UP x the best), the winner up to TIMED_CALLS times
    assert timer.calls.count("slow") == 1
    assert timer.calls.count("loop") == chooser.TIMED_CALLS


def test_forced_plans_and_autograd_do_not_measure(fresh):
    ref, fast = _model()
    timer = fresh({})
    x = _x()
    for plan in ("loop", "grouped", "direct"):
        fast.frozen_plan = plan
        _check_matches_reference(ref, fast, x)
    fast.frozen_plan = "measure"
    fast.freeze_conv()
    xx = x.clone().requires_grad_()
    fast(xx)["logits"].sum().backward()  # frozen path with an input gradient: loop
    assert fast.plan()["frozen_last_run"] == ["loop"] * 3 and xx.grad is not None
    assert timer.calls == []


def test_cpu_auto_keeps_the_static_rule():
    assert FastDERNet("resnet32").resolved_frozen_plan("cpu") in ("direct", "loop")
    assert FastDERNet("resnet32").resolved_frozen_plan("cuda") == "measure"


# ================================================================== CUDA graphs (GPU only)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("plan", ["loop", "grouped"])
def test_graph_replay_matches_eager(plan):
    ref, fast = _model(device="cuda")
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for n in (4, 4, 3):
            x = _x(n=n, seed=n, device="cuda")
            folded = fast._frozen_folded(list(fast.convnets))
            eager, _ = fast._plan_runner(folded, x, plan)
            graph, how = fast._plan_runner(folded, x, plan + "+graph")
            assert isinstance(graph, G.FrozenGraph) and how[0] == plan + "+graph"
            got = graph(x)
            torch.testing.assert_close(got, eager(x), **close)
            kept = got.clone()
            x2 = _x(n=n, seed=n + 10, device="cuda")
            torch.testing.assert_close(graph(x2), eager(x2), **close)
            assert torch.equal(got, kept)  # a replay does not overwrite an earlier output
        assert len(fast._plan_cache["graphs"]) == 2  # captured for batch 4 and batch 3
        # a model change (weights edited, invalidate_plan) captures anew with the new weights
        old = graph
        for p in fast.convnets[0].parameters():
            p.mul_(1.5)
        fast.invalidate_plan()
        x = _x(n=3, device="cuda")
        folded = fast._frozen_folded(list(fast.convnets))
        graph, _ = fast._plan_runner(folded, x, plan + "+graph")
        eager, _ = fast._plan_runner(folded, x, plan)
        assert graph is not old
        torch.testing.assert_close(graph(x), eager(x), **close)
        assert not torch.allclose(old(x), graph(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_plan_on_cuda_matches_reference(fresh):
    ref, fast = _model(device="cuda")
    fresh({"grouped+graph": 0.001})
    x = _x(n=8, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no candidate may be dropped
        with torch.no_grad():
            got, want = fast(x), ref(x)
    assert fast.plan()["frozen_choice"]["chosen"] == "grouped+graph"
    assert {"loop", "grouped", "loop+graph", "grouped+graph"} <= set(
        fast.plan()["frozen_choice"]["timings_ms"])
    tol = chooser.tolerance(x.dtype, x.device)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=tol, atol=tol)
    # the real timer, end to end
    with torch.no_grad():
        folded = fast._frozen_folded(list(fast.convnets))
        choice, _ = chooser.choose(("real",), fast._frozen_candidates(folded, x), x,
                                   timer=chooser.wall_timer, cache={})
    assert choice.chosen in choice.seconds and all(v > 0 for v in choice.seconds.values())
