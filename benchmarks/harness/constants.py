"""Fixed settings of the benchmark suite: the training hyperparameters the timed steps use, the
backbones' shapes, the workloads and providers (with the descriptions the report prints) and
the tolerance of the equivalence check."""

CLASSES_PER_TASK = 10
LAMBDA_A = 1.0  # official DER: auxiliary loss weight from step 1 on
LAMBDA_S = 1e-3  # a fixed sparsity weight (the trainer adapts it to its budget)
S_TRAIN = 5.0  # mask temperature used by the timed stage-1 steps (mid-anneal)
S_MAX = 400.0
TEMPERATURE = 5.0  # stage 2 logits / T (CIFAR)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

# backbone -> (batch, image side); ResNet-18-CIFAR at batch 16 to fit the CPU budget (on CUDA
# it runs at the paper's batch 128: BACKBONES_CUDA)
BACKBONES = {"resnet32": (128, 32), "resnet18_cifar": (16, 32)}
BACKBONES_CUDA = {"resnet32": (128, 32), "resnet18_cifar": (128, 32)}

WORKLOADS = ("infer", "stage1", "stage2", "floor", "epoch")
WORKLOAD_DOC = {
    "infer": "eval forward of the logits (no_grad), every extractor pruned and frozen",
    "stage1": "one stage-1 step: forward, CE + aux CE + lambda_s * sparsity, backward, "
              "HAT grad compensation, SGD step, clamp e; t-1 frozen pruned extractors + 1 "
              "trainable masked one",
    "stage2": "one stage-2 step: classifier only (all extractors frozen), CE(logits / 5), "
              "backward, SGD step",
    "floor": "the floor of a stage-1 step: one trainable masked extractor + head, CE + "
             "sparsity, backward, SGD step (= stage1 at t=1)",
    "epoch": "a stage-1 epoch over a fixed dataset of 4 batches, s annealed per batch",
}
EPOCH_BATCHES = 4

ALL_PROVIDERS = ("reference", "reference_cl", "compile", "func", "fast", "fast_loop",
                 "fast_grouped", "fast_cl")
# run unless DER_FAST_BENCH_PROVIDERS names others (fast_cl: opt-in layout, on request only)
DEFAULT_PROVIDERS = tuple(p for p in ALL_PROVIDERS if p != "fast_cl")
# the compile grid (DER_FAST_BENCH=compile, benchmarks/compile_grid.py): fast against the
# reference eager and compiled
COMPILE_GRID_PROVIDERS = ("reference", "compile", "fast")
COMPILE_GRID_WORKLOADS = ("stage1", "stage2", "infer")
COMPILE_GRID_TS = (1, 2, 5, 10)
COMPILE_GRID_DENSITIES = (1.0, 0.3)
# inductor's compile worker count (benchmarks/harness/isolation.py sets it to 1 unless given)
COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"
PROVIDER_DOC = {
    "reference": "DERNet eager (loop over extractors, masks as multiplications)",
    "reference_cl": "DERNet eager, model and input in channels_last",
    "compile": "torch.compile(DERNet) (inductor, default mode; extras record compile time)",
    "func": "frozen extractors as a torch.func ensemble (stack_module_state + "
            "functional_call + vmap; pruned ones zero-padded to full width with binary "
            "gates); trainable extractor and head eager",
    "fast": "FastDERNet.from_reference, frozen_plan='auto'",
    "fast_loop": "FastDERNet, frozen_plan='loop'",
    "fast_grouped": "FastDERNet, frozen_plan='grouped'",
    "fast_cl": "FastDERNet, frozen_plan='auto', trainable extractor in channels_last (opt-in)",
}


# The equivalence check: ground truth is the reference run in float64; a
# provider's error must be no worse than CHECK_FACTOR x the float32 reference's own error plus a
# small atol (CHECK_ATOL x the output's max |value|), per output tensor (logits, aux logits,
# loss, the gradient of every trainable parameter). "The fp32 reference's own error" is the
# larger of two equally valid fp32 runs of the reference, NCHW and channels_last: gradients of a
# deep train-mode-BN ResNet on random labels cancel a lot, their fp32 error is up to ~1e-2 of
# the max, and one run alone can be luckily close to float64 (measured: channels_last vs NCHW
# differ by up to 400x in some gradients' error, both being plain fp32 rounding).
CHECK_FACTOR = 2.0
CHECK_ATOL = 1e-4
