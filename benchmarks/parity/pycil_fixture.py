"""PyCIL's own numbers as a test fixture: runs PyCIL's DER code (DERNet, resnet32, CIFAR args)
from a PyCIL checkout at a pinned commit and writes a state_dict, an input batch and PyCIL's
outputs and gradients to ``tests/data/pycil_dernet_resnet32.pt`` (data, not code), which
``tests/test_pycil_fixture.py`` loads into der_fast's DERNet and FastDERNet.

    mkdir -p /tmp/pycil    # or use a git checkout of G-U-N/PyCIL at that commit
    git --git-dir=<clone of G-U-N/PyCIL>/.git archive \\
        87cc4110d60765dc3f64af7ef7a693efed8418ff utils convs models | tar -x -C /tmp/pycil
    python benchmarks/parity/pycil_fixture.py [--pycil /tmp/pycil] \\
        [--out tests/data/pycil_dernet_resnet32.pt]

(the committed fixture was written with torch 2.14.1 on CPU; rerunning reproduces it bit for
bit there: the script runs at one thread).

Nothing of PyCIL is copied into this repository: its modules are imported from the checkout
given by ``--pycil`` (default ``/tmp/pycil``). Before importing, the script checks the git blob
hash of every PyCIL file it will run against ``PINNED_BLOBS`` (the files' hashes at
``PINNED_COMMIT``, from ``git ls-tree -r``), and after importing that no other file of the
checkout was loaded; a git checkout must also be at ``PINNED_COMMIT``. PyCIL's ``models/der.py``
imports numpy, scipy (``models/base.py``: ``cdist``) and tqdm, none of which the code run here
uses: scipy and tqdm are replaced by empty stand-in modules in ``sys.modules`` only if they are
not installed (numpy is required).

What runs, and whose code it is:

* PyCIL: ``models.der.DER(args)`` (builds ``utils.inc_net.DERNet(args, False)``) with the args
  of PyCIL's ``exps/der.json`` (cifar100, resnet32, init_cls = increment = 10) on the CPU;
  ``DER.incremental_train`` twice (update_fc(10), then update_fc(20) and the first extractor's
  parameters set to ``requires_grad = False``) with its data loading stubbed out (a one-item
  dataset that is never iterated) and ``_train`` / ``build_rehearsal_memory`` replaced by
  no-ops; ``DER.after_task`` between them; ``DER.train`` for train mode (network in train mode,
  the old extractor in eval mode); ``DERNet.forward``.
* Ours: random weights (they replace PyCIL's initialisation), BatchNorm statistics, the inputs,
  and the loss, which is PyCIL's stage loss from ``DER._update_representation`` (inline code
  there, so written out here): ``cross_entropy(logits, y) + cross_entropy(aux_logits, y_aux)``
  with ``y_aux = y - known + 1`` where positive, else 0 (known = 10).

Model state (seed ``WEIGHT_SEED``): every conv weight is an int8 code times a power of two
(stored as int8 + scale: the state_dict fits in < 2 MB), everything else is float32 (BN
affine parameters, classifiers), so every value is exact in float32 and float64. BN running
statistics are the batch statistics of a random calibration batch (both extractors, train
mode, cumulative average) perturbed at random (mean + 0.1 std N(0,1), var x exp(0.3 N(0,1))),
rounded to float32; ``num_batches_tracked`` is 0. The model then runs in float64.

Recorded per mode (``train``: ``DER.train()``; ``eval``: ``network.eval()``), each from a fresh
copy of that state, on the float64 input (float32-exact values, 4 x 3 x 32 x 32, requiring a
gradient) with fixed labels: logits, aux_logits, features, the loss, the gradient of the loss
with respect to the input (in full) and to every parameter with ``requires_grad`` (PyCIL's
names; resnet32's unused ``fc`` requires a gradient but gets none: listed in ``grad_none``).
Gradients of conv weights (4-d) are stored as ``PROJ_K`` projections ``V @ grad.flatten()``
and their L2 norm; every other gradient in full. ``V`` (``[PROJ_K, numel]``, float64) is
``torch.randn((PROJ_K, numel), generator=torch.Generator().manual_seed(PROJ_SEED +
zlib.crc32(name.encode())), dtype=torch.float64)``. In train mode also every BatchNorm buffer after the forward (the new extractor's running statistics move with
momentum 0.1, the old extractor's must not). All recorded numbers are float64.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import subprocess
import sys
import types
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

PINNED_COMMIT = "87cc4110d60765dc3f64af7ef7a693efed8418ff"  # G-U-N/PyCIL, 2025-03-12
# git blob hashes at PINNED_COMMIT of every PyCIL file that `import models.der` loads
PINNED_BLOBS = {
    "convs/ACL_buffer.py": "2b05a00b8089e8fb7b6cdc997ddd22b9b680399e",
    "convs/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "convs/cifar_resnet.py": "a2668dd45ccd05b6a881b544b6008abd8d8b58af",
    "convs/linears.py": "2d3a1ac0a616288adbfec703fc39caa7214e0090",
    "convs/memo_cifar_resnet.py": "3d585519f60bd2d421d277aed4affcb16e9d4af5",
    "convs/memo_resnet.py": "507b0bd60e35528b93a5820af373b1a1a06d2aff",
    "convs/modified_represnet.py": "99d2854d077c9023d1bde69a3cde77168caf4b61",
    "convs/resnet.py": "30ff240d25b61de847b33dbf3cc6d56039f8c986",
    "convs/resnet_cbam.py": "dbf59f686e9a7eb64c2572d28f3995eb5eb9bc0f",
    "convs/ucir_cifar_resnet.py": "9e71b742f56925d3a717228a8450c43e59dca39f",
    "convs/ucir_resnet.py": "14d424590eb5fbedae9f41e8693b3d3d6eb1fd19",
    "models/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "models/base.py": "972e26ab83dc6dc5d23902b6f536ab768259dfc7",
    "models/der.py": "a750019cff7ef6df1c55411eac92d3bc477c6144",
    "utils/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "utils/inc_net.py": "d2c668ce1f5cedeba44ad40d4470fb4da5acadc5",
    "utils/toolkit.py": "cde11a8aab6f526faf9d3d53f334d98ea1d29d31",
}

# PyCIL's exps/der.json, on the CPU
ARGS = {"prefix": "reproduce", "dataset": "cifar100", "memory_size": 2000,
        "memory_per_class": 20, "fixed_memory": False, "shuffle": True, "init_cls": 10,
        "increment": 10, "model_name": "der", "convnet_type": "resnet32", "seed": [1993]}
TASKS = (10, 10)  # classes per step: two extractors
WEIGHT_SEED, DATA_SEED, PROJ_SEED = 2027, 31, 1234
PROJ_K = 8
BATCH, HW = 4, 32
LABELS = (3, 12, 7, 19)  # two old classes (aux target 0) and two new ones
FORMAT = 1
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "pycil_dernet_resnet32.pt"


# ---------------------------------------------------------------- the PyCIL checkout
def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_checkout(root: Path) -> None:
    """The checkout's files that will run are PyCIL's at PINNED_COMMIT (and a git checkout is
    at that commit)."""
    bad = []
    for rel, want in PINNED_BLOBS.items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel}: missing")
        elif git_blob_hash(path.read_bytes()) != want:
            bad.append(f"{rel}: differs from {PINNED_COMMIT[:12]}")
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        if head != PINNED_COMMIT:
            bad.append(f"git HEAD is {head or '?'}, pinned {PINNED_COMMIT}")
    if bad:
        raise SystemExit(f"PyCIL checkout {root} is not the pinned one:\n  " + "\n  ".join(bad))


def import_pycil(root: Path):
    """PyCIL's ``models.der`` module from ``root`` (checked first)."""
    check_checkout(root)
    for name in ("utils", "convs", "models"):
        if name in sys.modules:
            raise SystemExit(f"a module named {name!r} is already imported; run this script "
                             "in a fresh interpreter")
    for name in ("tqdm", "scipy.spatial.distance"):  # imported by PyCIL, unused here
        if importlib.util.find_spec(name.split(".")[0]) is None:
            stub = types.ModuleType(name)
            stub.tqdm, stub.cdist = (lambda *a, **k: None), (lambda *a, **k: None)
            for part in (name.split(".")[0], name):
                sys.modules.setdefault(part, stub)
    sys.path.insert(0, str(root))
    import models.der as der  # noqa: E402  (PyCIL's)
    loaded = {Path(m.__file__).resolve().relative_to(root.resolve()).as_posix()
              for m in list(sys.modules.values())
              if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(
                  root.resolve())}
    extra = sorted(loaded - set(PINNED_BLOBS))
    if extra:
        raise SystemExit(f"PyCIL imported files that are not pinned: {extra}")
    return der


class _DataManager:
    """What ``DER.incremental_train`` asks of PyCIL's DataManager (the loaders it builds are
    never iterated: ``_train`` is a no-op here)."""

    def get_task_size(self, task: int) -> int:
        return TASKS[task]

    def get_dataset(self, indices, source, mode, appendent=None):
        return [(0, torch.zeros(3, HW, HW), 0)]


# ---------------------------------------------------------------- the model state
def build_learner(der):
    """PyCIL's DER learner after its second ``incremental_train`` (training skipped)."""
    torch.manual_seed(ARGS["seed"][0])  # PyCIL's initialisation (all replaced below)
    args = dict(ARGS, device=[torch.device("cpu")])
    learner = der.DER(args)
    learner._train = lambda *a, **k: None
    learner.build_rehearsal_memory = lambda *a, **k: None
    dm = _DataManager()
    with warnings.catch_warnings():  # DataLoader(num_workers=8), never iterated
        warnings.simplefilter("ignore", UserWarning)
        for task in range(len(TASKS)):
            if task:
                learner.after_task()
            learner.incremental_train(dm)
    return learner


def _pow2(v: float) -> float:
    return float(2.0 ** round(torch.log2(torch.tensor(v)).item()))


def randomize(net) -> dict:
    """Random float32-exact weights and BN statistics in ``net`` (float64 afterwards); returns
    ``{conv weight name: scale}`` of the int8-coded conv weights."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    net.double()
    scales = {}
    with torch.no_grad():
        for mname, m in net.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                name = f"{mname}.{pname}"
                if isinstance(m, torch.nn.Conv2d):  # int8 code x power of two, ~ He (fan in)
                    code = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    scales[name] = _pow2((2.0 / p[0].numel()) ** 0.5 / 32)
                    p.copy_(code.mul(32).round().clamp(-127, 127) * scales[name])
                    continue
                r = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if isinstance(m, torch.nn.BatchNorm2d):
                    r = 1 + 0.25 * r if pname == "weight" else 0.1 * r
                elif pname == "weight":  # fc, aux_fc (SimpleLinear), resnet32's unused fc
                    r = r / p.shape[1] ** 0.5
                else:
                    r = 0.1 * r
                p.copy_(r.float())
        # running statistics: a calibration batch's statistics, perturbed
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the batch's statistics
        net.train()
        net(torch.randn(16, 3, HW, HW, generator=g, dtype=torch.float64))
        for m in bns:
            std = m.running_var.sqrt()
            m.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=g,
                                                        dtype=torch.float64))
            m.running_var.mul_(torch.exp(0.3 * torch.randn(std.shape, generator=g,
                                                           dtype=torch.float64)))
            m.running_mean.copy_(m.running_mean.float())
            m.running_var.copy_(m.running_var.float())
            m.num_batches_tracked.zero_()
            m.momentum = 0.1  # PyCIL's (nn.BatchNorm2d's default)
    return scales


def encode_state_dict(sd: dict, scales: dict) -> tuple:
    """(state_dict with int8 codes for the conv weights and float32 elsewhere, scales)."""
    out = {}
    for k, v in sd.items():
        if k in scales:
            code = v / scales[k]
            assert torch.equal(code, code.round()) and code.abs().max() <= 127
            out[k] = code.to(torch.int8)
        elif v.dtype.is_floating_point:
            assert torch.equal(v.float().double(), v)
            out[k] = v.float()
        else:
            out[k] = v.clone()
    return out, dict(scales)


def projections(name: str, grad: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROJ_SEED + zlib.crc32(name.encode()))
    v = torch.randn((PROJ_K, grad.numel()), generator=g, dtype=torch.float64)
    return v @ grad.reshape(-1).double()


# ---------------------------------------------------------------- the runs
def run_mode(learner, net0, mode: str, x: torch.Tensor, y: torch.Tensor, known: int) -> dict:
    net = copy.deepcopy(net0)
    learner._network = net
    if mode == "train":
        learner.train()  # PyCIL's DER.train: network.train(), old extractors .eval()
    else:
        net.eval()
    x = x.clone().requires_grad_(True)
    out = net(x)
    logits, aux_logits = out["logits"], out["aux_logits"]
    # PyCIL's DER._update_representation loss
    aux_targets = torch.where(y - known + 1 > 0, y - known + 1, 0)
    loss = F.cross_entropy(logits, y) + F.cross_entropy(aux_logits, aux_targets)
    loss.backward()
    rec = {"training": {n: m.training for n, m in net.named_modules()
                        if isinstance(m, torch.nn.BatchNorm2d)},
           "logits": logits.detach().clone(), "aux_logits": aux_logits.detach().clone(),
           "features": out["features"].detach().clone(), "loss": loss.detach().clone(),
           "input_grad": x.grad.clone(), "grad_full": {}, "grad_proj": {}, "grad_norm": {},
           "grad_none": []}
    rec["trainable"] = [n for n, p in net.named_parameters() if p.requires_grad]
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        if p.grad is None:  # resnet32's unused fc: trainable in PyCIL, never used
            rec["grad_none"].append(n)
        elif p.dim() == 4:
            rec["grad_proj"][n] = projections(n, p.grad)
            rec["grad_norm"][n] = p.grad.norm().reshape(())
        else:
            rec["grad_full"][n] = p.grad.clone()
    if mode == "train":
        rec["buffers_after"] = {k: v.clone() for k, v in net.state_dict().items()
                                if "running_" in k or "num_batches" in k}
    for k in ("logits", "aux_logits", "features", "loss", "input_grad"):
        assert rec[k].dtype == torch.float64 and torch.isfinite(rec[k]).all(), k
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pycil", type=Path, default=Path("/tmp/pycil"),
                    help="PyCIL checkout at PINNED_COMMIT (default /tmp/pycil)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    der = import_pycil(args.pycil)
    learner = build_learner(der)
    net = learner._network
    assert type(net).__name__ == "DERNet" and type(net).__module__ == "utils.inc_net"
    assert net.task_sizes == list(TASKS) and learner._known_classes == TASKS[0]
    assert not any(p.requires_grad for p in net.convnets[0].parameters())
    scales = randomize(net)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(BATCH, 3, HW, HW, generator=g).double()  # float32-exact values
    y = torch.tensor(LABELS)
    known = learner._known_classes
    records = {mode: run_mode(learner, net, mode, x, y, known) for mode in ("train", "eval")}
    state_dict, scales = encode_state_dict(sd, scales)
    fixture = {
        "format": FORMAT,
        "pycil_commit": PINNED_COMMIT, "pycil_blobs": dict(PINNED_BLOBS),
        "torch_version": str(torch.__version__),
        "args": dict(ARGS), "task_sizes": list(TASKS), "known_classes": known,
        # PyCIL's state_dict: conv weights = state_dict[k].double() * int8_scale[k]
        "state_dict": state_dict, "int8_scale": scales,
        "x": x, "y": y, "aux_y": torch.where(y - known + 1 > 0, y - known + 1, 0),
        "projection": {"seed": PROJ_SEED, "k": PROJ_K,
                       "rule": "V = torch.randn((k, numel), generator=torch.Generator()"
                               ".manual_seed(seed + zlib.crc32(name.encode())), "
                               "dtype=torch.float64); proj = V @ grad.flatten()"},
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    r = records["eval"]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): PyCIL {PINNED_COMMIT[:12]}, "
          f"|logits| <= {r['logits'].abs().max():.3g} (eval), "
          f"{records['train']['logits'].abs().max():.3g} (train), "
          f"loss {r['loss']:.4f} (eval) {records['train']['loss']:.4f} (train)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
