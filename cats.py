"""CATS: Contextually-Aware Thresholding for Sparsity (Lee et al. 2024, arXiv 2404.08763).

The thresholded activation, the quantile maths that picks one threshold per layer, and threshold files.
Imports only torch (and safetensors for the files), so it can be copied into another project.
"""
import torch
from torch import Tensor


def cats_activation(gate: Tensor, threshold: Tensor) -> Tensor:
    """CATS_t(v) = v where |v| > t, else 0; v = SiLU(W_gate x). Zeroed entries pass no gradient."""
    return torch.where(gate.abs() > threshold, gate, torch.zeros((), dtype=gate.dtype, device=gate.device))
