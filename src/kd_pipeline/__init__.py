"""kd_pipeline: offline knowledge distillation for causal LMs from precomputed teacher top-k."""

from kd_pipeline.core.memory import bound_kernel_caches

__version__ = "0.1.0"

# Before anything of ours runs a CPU matmul, or oneDNN's per-shape kernel caches grow the RSS
# by over a GiB during the default training (core/memory.py).
bound_kernel_caches()
