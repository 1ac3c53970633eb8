"""The ``func`` provider: DERNet's frozen extractors run as one torch.func ensemble
(stack_module_state + functional_call + vmap)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from der_fast import masks as M
from der_fast.backbones import MaskedResNet, conv_layers
from der_fast.reference import DERNet


class _VmapExtractor(MaskedResNet):
    """A frozen (possibly pruned, possibly binary-masked) extractor as a full-width network
    with its binary masks as float ``gate_*`` buffers: pruned channels get zero weights, zero
    BN affine and a zero gate. Every extractor of an architecture then has the same structure,
    so they stack (torch.func.stack_module_state). Exact: a pruned net computes the function of
    the binary-masked full-width one (der_fast.backbones)."""

    def __init__(self, net: MaskedResNet):
        super().__init__(net.arch, net.in_channels, masked=False)
        p0 = next(net.parameters())
        self.to(device=p0.device, dtype=p0.dtype)
        dev = p0.device
        kept = {p: net.kept(p).to(dev) for p in net.widths}
        kept["input"] = torch.arange(net.in_channels, device=dev)
        bin_masks = M.binary_masks(net) if net.mask_e is not None else {}
        with torch.no_grad():
            for p, full in self.full_widths.items():
                g = torch.zeros(full, device=dev, dtype=p0.dtype)
                on = bin_masks[p].to(p0.dtype) if p in bin_masks else 1.0
                g[kept[p]] = on
                self.register_buffer(f"gate_{p}", g)
            for path, src, dst, _ in conv_layers(net.arch):
                w_new, w_old = self.get_submodule(path).weight, net.get_submodule(path).weight
                w_new.zero_()
                w_new[kept[dst][:, None], kept[src][None, :]] = w_old.detach()
                head, _, leaf = path.rpartition(".")
                bn = {"conv": "bn", "conv1": "bn1", "conv2": "bn2", "sc_conv": "sc_bn"}[leaf]
                b_new, b_old = self.get_submodule(f"{head}.{bn}"), net.get_submodule(
                    f"{head}.{bn}")
                b_new.weight.zero_()
                b_new.bias.zero_()
                b_new.running_mean.zero_()
                b_new.running_var.fill_(1.0)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(b_new, name)[kept[dst]] = getattr(b_old, name).detach()
        self.requires_grad_(False)
        self.eval()

    def gate(self, point: str):
        return getattr(self, f"gate_{point}")

    def _shortcut(self, blk, x, si: int, bi: int):
        if blk.sc_conv is not None or bi > 0 or si == 0:
            return super()._shortcut(blk, x, si, bi)
        xs = x[:, :, :: blk.stride, :: blk.stride]  # option A at full width: pad with zeros
        return F.pad(xs, (0, 0, 0, 0, 0, self.full_widths[f"stream{si}"] - xs.shape[1]))


class FuncEnsemble(nn.Module):
    """DERNet's forward with the frozen extractors run as one torch.func ensemble:
    ``vmap(functional_call(base, stacked params/buffers, x))`` over the extractors, the
    trainable extractor and the classifiers eager (they are ``model``'s own modules, so an
    optimiser over ``model``'s parameters trains them)."""

    def __init__(self, model: DERNet):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: no duplicate params
        self._key = None

    @staticmethod
    def _is_frozen(net) -> bool:
        return not net.training and not any(p.requires_grad for p in net.parameters())

    def _prepare(self, frozen: list) -> None:
        copies = [_VmapExtractor(n) for n in frozen]
        params, buffers = torch.func.stack_module_state(copies)
        self._params = {k: v.detach() for k, v in params.items()}
        self._buffers = buffers
        base = copy.deepcopy(copies[0]).to("meta")
        self._base = base
        full = base.out_dim
        dev = self._params[next(iter(self._params))].device
        self._cols = torch.cat([i * full + n.kept(f"stream{len(n.arch.stages) - 1}").to(dev)
                                for i, n in enumerate(frozen)])

    def _call(self, params, buffers, x):
        return torch.func.functional_call(self._base, (params, buffers), (x,))

    def frozen_features(self, frozen: list, x: torch.Tensor) -> torch.Tensor:
        key = tuple((id(n), bool(n.binary_masks)) for n in frozen)
        if key != self._key:
            self._prepare(frozen)
            self._key = key
        with torch.no_grad():
            f = torch.vmap(self._call, in_dims=(0, 0, None))(self._params, self._buffers, x)
        n, b, d = f.shape
        return f.permute(1, 0, 2).reshape(b, n * d).index_select(1, self._cols)

    def forward(self, x: torch.Tensor) -> dict:
        m = self.model
        nets = list(m.convnets)
        frozen = [i for i, n in enumerate(nets) if self._is_frozen(n)]
        per_net = [None] * len(nets)
        if frozen:
            u = self.frozen_features([nets[i] for i in frozen], x)
            for i, piece in zip(frozen, u.split([nets[i].out_dim for i in frozen], 1)):
                per_net[i] = piece
        for i, n in enumerate(nets):
            if per_net[i] is None:
                per_net[i] = n(x)
        features = torch.cat(per_net, 1) if len(per_net) > 1 else per_net[0]
        logits = m.fc(features)
        aux = m.aux_fc(features[:, -nets[-1].out_dim:]) if len(nets) > 1 else None
        return {"logits": logits, "aux_logits": aux, "features": features}
