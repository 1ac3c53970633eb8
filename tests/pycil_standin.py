"""A stand-in for PyCIL's DER learner (models/der.py + models/base.py), written for these tests
in the same shape: the same network calls in the same order. Only the import line below is
swapped to run it with FastDERNet."""

import numpy as np
import torch
from torch.nn import functional as F

from der_fast import DERNet

EPSILON = 1e-8


class DER:
    def __init__(self, args):
        self.args = args
        self._cur_task, self._known_classes, self._total_classes = -1, 0, 0
        self._network = DERNet(args, False)
        self._memory = []  # (x, y) exemplars
        self._class_means = None

    def after_task(self):
        self._known_classes = self._total_classes

    def incremental_train(self, tasks):
        self._cur_task += 1
        x, y = tasks[self._cur_task]
        self._total_classes = self._known_classes + len(torch.unique(y))
        self._network.update_fc(self._total_classes)
        if self._cur_task > 0:
            for i in range(self._cur_task):
                for p in self._network.convnets[i].parameters():
                    p.requires_grad = False
        if self._memory:
            x = torch.cat([x] + [m[0] for m in self._memory])
            y = torch.cat([y] + [m[1] for m in self._memory])
        self._train(x, y)
        self.build_rehearsal_memory(tasks, self.args["memory_per_class"])

    def train(self):
        self._network.train()
        self._network.convnets[-1].train()
        for i in range(self._cur_task):
            self._network.convnets[i].eval()

    def _train(self, x, y):
        opt = torch.optim.SGD(filter(lambda p: p.requires_grad, self._network.parameters()),
                              lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(self._cur_task)
        for _ in range(self.args["epochs"]):
            self.train()
            for b in torch.randperm(len(y), generator=g).split(8):
                out = self._network(x[b])
                loss = F.cross_entropy(out["logits"], y[b])
                if self._cur_task > 0:
                    aux_t = torch.where(y[b] - self._known_classes + 1 > 0,
                                        y[b] - self._known_classes + 1, 0)
                    loss = loss + F.cross_entropy(out["aux_logits"], aux_t)
                opt.zero_grad()
                loss.backward()
                opt.step()
        if self._cur_task > 0:
            self._network.weight_align(self._total_classes - self._known_classes)

    def _extract_vectors(self, x):
        self._network.eval()
        with torch.no_grad():
            return self._network.extract_vector(x).numpy()

    def build_rehearsal_memory(self, tasks, m):
        x_all = torch.cat([t[0] for t in tasks[: self._cur_task + 1]])
        y_all = torch.cat([t[1] for t in tasks[: self._cur_task + 1]])
        self._class_means = np.zeros((self._total_classes, self._network.feature_dim))
        self._memory = []
        for c in range(self._total_classes):
            xc = x_all[y_all == c]
            v = self._extract_vectors(xc)
            v = (v.T / (np.linalg.norm(v.T, axis=0) + EPSILON)).T
            mu, chosen, acc = v.mean(0), [], np.zeros_like(v[0])
            for k in range(1, m + 1):  # herding
                d = np.sum((mu - (acc + v) / k) ** 2, 1)
                d[chosen] = np.inf
                i = int(np.argmin(d))
                chosen.append(i)
                acc += v[i]
            self._memory.append((xc[chosen], torch.full((m,), c)))
            e = self._extract_vectors(xc[chosen])
            e = (e.T / (np.linalg.norm(e.T, axis=0) + EPSILON)).T
            mean = e.mean(0)
            self._class_means[c] = mean / np.linalg.norm(mean)

    def eval_task(self, x, y):
        self._network.eval()
        with torch.no_grad():
            logits = self._network(x)["logits"]
        v = self._extract_vectors(x)
        v = (v.T / (np.linalg.norm(v.T, axis=0) + EPSILON)).T
        d = ((self._class_means[:, None, :] - v[None]) ** 2).sum(-1).T
        return logits, np.argmin(d, 1)
