"""der_fast: DER (Dynamically Expandable Representation, Yan, Xie and He, CVPR 2021)
for class-incremental learning, with a plain PyTorch reference and a fused fast path."""

__version__ = "0.1.0"

from .reference import DERNet, UntrainedMasksWarning  # noqa: E402,F401


def __getattr__(name):  # lazy: the fast model pulls in the compiled ops
    if name == "FastDERNet":
        from .fast import FastDERNet

        return FastDERNet
    raise AttributeError(name)
