"""NME (nearest mean of exemplars, PyCIL's ``_eval_nme``) and PyCIL-grouped forgetting."""

import csv
import importlib

import numpy as np
import pytest
import torch

from der_fast import train as T
from der_fast.train.outputs import format_table

# der_fast.train exports a function named evaluate, which hides the submodule
E = importlib.import_module("der_fast.train.evaluate")

TINY = ["--data-root", "embedded", "--train-per-class", "24", "--test-per-class", "10",
        "--init-cls", "2", "--increment", "4", "--epochs", "1", "--epochs-stage2", "1",
        "--batch-size", "16", "--memory", "20", "--no-progress"]


def test_nme_hand_case():
    # class means along the axes (classes 3, 7, 9); features nearest to one of them in angle
    classes = torch.tensor([3, 7, 9])
    means = torch.eye(3)
    feats = torch.tensor([[5.0, 0.1, 0.0],     # -> 3
                          [0.0, 0.2, 0.1],     # -> 7 (scale does not matter: normalised)
                          [1.0, 1.0, 3.0],     # -> 9
                          [-1.0, 0.5, 0.0]])   # -> 7
    assert E.nme_predict(feats, classes, means).tolist() == [3, 7, 9, 7]


class _Mem:
    def __init__(self, ex):
        self.exemplars = ex

    @property
    def classes(self):
        return sorted(self.exemplars)


def test_exemplar_means_normalise_then_average(monkeypatch):
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -4.0], [0.0, -1.0]])
    monkeypatch.setattr(E, "extract", lambda model, data, split, idx, bs, dev: feats[idx])
    classes, means = E.exemplar_means(None, None, _Mem({0: np.array([0, 1]),
                                                        1: np.array([2, 3])}), 8, "cpu")
    assert classes.tolist() == [0, 1]
    s = 2 ** -0.5
    torch.testing.assert_close(means, torch.tensor([[s, s], [0.0, -1.0]], dtype=means.dtype))
    assert E.exemplar_means(None, None, _Mem({0: np.array([0]), 1: np.array([], int)}), 8,
                            "cpu") is None


def test_pycil_grouping_and_forgetting():
    y = torch.tensor([0, 5, 9, 10, 15, 19, 20])
    pred = torch.tensor([0, 5, 1, 10, 0, 0, 20])
    # blocks start below the largest label (20): [0, 10), [10, 20); label 20 in none (PyCIL)
    assert E.pycil_grouped(pred, y) == pytest.approx([200 / 3, 100 / 3])
    # PyCIL's best includes the last step: block 1 (70 then 75) forgets 0, not -5
    hist = [[90.0], [80.0, 70.0], [60.0, 75.0, 50.0]]
    assert E.forgetting_pycil(hist) == pytest.approx(15.0)
    assert T.forgetting(hist) == pytest.approx(12.5)
    assert E.forgetting_pycil([[50.0]]) == 0.0
    # more blocks than steps: the first (steps - 1) blocks
    assert E.forgetting_pycil([[80.0, 60.0], [70.0, 50.0, 40.0, 30.0]]) == pytest.approx(10.0)


def test_nme_in_outputs_and_resume(tmp_path):
    cfg, _ = T.config_from_args(TINY + ["--out", str(tmp_path / "a"), "--no-plots"])
    m = T.run(cfg.validate(), log=lambda *a: None)
    steps, summ = m["steps"], m["summary"]
    for s in steps:
        assert 0.0 <= s["nme_top1"] <= 100.0
        assert isinstance(s["pycil_grouped_top1"], list)
    assert summ["avg_incremental_nme"] == pytest.approx(np.mean([s["nme_top1"] for s in steps]))
    assert summ["last_nme"] == steps[-1]["nme_top1"]
    assert "forgetting_pycil" in summ and "forgetting_pycil_nme" in summ
    assert " nme " in format_table(steps).splitlines()[0]
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert [float(r["nme_top1"]) for r in rows] == pytest.approx([s["nme_top1"] for s in steps])
    # the NME of the final step, recomputed from the memory the run ended with, is the same
    # as what the checkpointed run reports on resume (nothing left to train)
    again = T.run(cfg, resume=True, log=lambda *a: None)
    assert [s["nme_top1"] for s in again["steps"]] == [s["nme_top1"] for s in steps]
