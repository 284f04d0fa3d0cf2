"""kd_pipeline: offline knowledge distillation for causal LMs from precomputed teacher top-k."""

__version__ = "0.1.0"
