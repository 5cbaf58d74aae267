"""CATS: Contextually-Aware Thresholding for Sparsity (Lee et al. 2024, arXiv 2404.08763).

The thresholded activation, the quantile maths that picks one threshold per layer, and threshold files.
Imports only torch (and safetensors for the files), so it can be copied into another project.

Quantiles are read from a histogram over the float32 bit pattern of |v|: for v >= 0 the bit pattern, read
as an integer, grows with v, so its top bits are a bin index. Keeping the exponent and 15 mantissa bits
gives bins 2^-15 of their value wide; only exponents for |v| in [2^-24, 2^8) get their own bins (smaller
and larger values are counted in the two end bins), which makes 2^20 bins, 8 MiB per layer however many
tokens go through it, and any number of quantiles are read from it afterwards. Each threshold is put on
an edge of the bin where the target is crossed, so the fraction of calibration values at or below it is
known exactly from the counts, and |realised - target| <= (count in that bin) / (2 * total) (the whole
count, in the two end bins, which only absurd targets reach). Bins are narrow, but |SiLU| folds back at
0.2785 (SiLU's minimum), so values pile up there and that bin can hold ~0.5% of the mass.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

FORMAT = "cats-thresholds/1"
DEFAULT_FILENAME = "cats_thresholds.safetensors"
MANTISSA_BITS = 15  # of float32's 23: a bin is at most 2^-15 of its value wide
LOW_EXP, HIGH_EXP = -24, 8  # |v| in [2^-24, 2^8) is binned finely; below and above share the end bins
N_BINS = (HIGH_EXP - LOW_EXP) << MANTISSA_BITS
FIRST_BIN = (127 + LOW_EXP) << MANTISSA_BITS  # bin 0 in units of the shifted bit pattern (127: exponent bias)


class ThresholdError(ValueError):
    """A threshold file we cannot use; the message says what is wrong and what to do."""


def cats_activation(gate: Tensor, threshold: Tensor) -> Tensor:
    """CATS_t(v) = v where |v| > t, else 0; v = SiLU(W_gate x). Zeroed entries pass no gradient.
    The compare is in fp32 whatever gate's dtype: a bf16 gate against an fp32 0-d t would otherwise round
    t to bf16 (PyTorch promotion), so the calibrated t, the Triton kernel and this path would disagree."""
    keep = gate.abs().float() > threshold
    return torch.where(keep, gate, torch.zeros((), dtype=gate.dtype, device=gate.device))


# ---------------------------------------------------------------------------------------------------
# Quantile maths

def abs_histogram(v: Tensor) -> Tensor:
    """Counts of |v| in the N_BINS bit-pattern bins (int64 [N_BINS]); add these up over batches."""
    bins = (v.detach().abs().float().view(torch.int32) >> (23 - MANTISSA_BITS)) - FIRST_BIN
    return torch.bincount(bins.clamp_(0, N_BINS - 1).flatten(), minlength=N_BINS)


def bin_edge(b: Tensor) -> Tensor:
    """The largest float32 that falls in bin b (for 0 <= b < N_BINS - 1): all of bin b is <= it."""
    return (((b + FIRST_BIN + 1) << (23 - MANTISSA_BITS)) - 1).to(torch.int32).view(torch.float32)


def thresholds_from_histogram(hist: Tensor, sparsity: float) -> tuple[Tensor, Tensor, Tensor]:
    """hist [..., N_BINS] -> (t, realised, bound), each [...]: t such that a fraction `sparsity` of the
    counted values is <= t, the fraction that actually is (exact, as t sits on a bin edge), and the bound
    |realised - sparsity| <= bound = (count in the crossing bin) / (2 * total), or / total at the end bins."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    hist = hist.cpu()
    cum = hist.cumsum(-1)
    total = cum[..., -1:].double()
    if (total == 0).any():
        raise ValueError("empty histogram: no activations were counted")
    k = sparsity * total  # target count of values <= t
    b = torch.searchsorted(cum.double(), k)  # crossing bin: the first whose cumulative count reaches k
    above = cum.gather(-1, b).double()  # values in bins <= b
    below = above - hist.gather(-1, b).double()  # values in bins < b
    # Put t on whichever edge of the crossing bin lands nearer the target: no assumption about how values
    # spread inside the bin, and no rounding can move a value across t. The end bins have one usable edge.
    forced = (b == 0) | (b == N_BINS - 1)
    upper = ((above - k <= k - below) | (b == 0)) & (b < N_BINS - 1)
    t = bin_edge(torch.where(upper, b, b - 1))
    realised = torch.where(upper, above, below) / total
    bound = (above - below) / torch.where(forced, 1.0, 2.0) / total
    return t.squeeze(-1), realised.squeeze(-1), bound.squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Which model a threshold file belongs to

def weights_fingerprint(tensors: Mapping[str, Tensor], samples: int = 64) -> str:
    """A cheap hash of a state dict: every name and shape, plus `samples` evenly spaced values of each
    tensor (a few KB read in all, one host sync). Values are hashed at bf16 precision, with magnitudes
    below fp16's normal range read as 0, so one checkpoint loaded in fp32, bf16 or fp16 hashes alike."""
    h = hashlib.sha256()
    picked = []
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}{tuple(t.shape)};".encode())
        flat = t.reshape(-1)
        n = min(samples, flat.numel())
        if n:
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
            picked.append(flat[idx].float())
    if picked:
        v = torch.cat(picked)
        v = torch.where(v.abs() < 2.0 ** -14, torch.zeros_like(v), v).to(torch.bfloat16)
        h.update(v.view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_signature(model) -> dict:
    """What a threshold file must match: shape of the model and a fingerprint of its weights.
    Works on anything with `.args` (n_layer, dim, ...) and `.state_dict()`, such as model.Transformer."""
    a = model.args
    return {"architecture": a.architecture, "n_layer": a.n_layer, "dim": a.dim,
            "intermediate_size": a.intermediate_size, "n_head": a.n_head, "n_kv_head": a.n_kv_head,
            "vocab_size": a.vocab_size, "fingerprint": weights_fingerprint(model.state_dict())}


# ---------------------------------------------------------------------------------------------------
# Threshold files: safetensors, one float32 [n_layer] tensor per sparsity, str -> str metadata

def default_threshold_path(ckpt_dir) -> Path:
    """Where calibrate.py writes thresholds and generate.py looks for them, unless told otherwise."""
    return Path(ckpt_dir) / DEFAULT_FILENAME


def sparsity_key(sparsity: float) -> str:
    return f"sparsity_{sparsity:.6g}"


def save_thresholds(path, thresholds: Mapping[float, Tensor], meta: Mapping) -> None:
    """Write {sparsity: [n_layer] thresholds} and meta (str values as they are, others as JSON) atomically:
    a temporary file in the same folder, then os.replace, so a crash never leaves a partial file."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {sparsity_key(s): t.detach().to("cpu", torch.float32).contiguous() for s, t in thresholds.items()}
    metadata = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_threshold_file(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a threshold file, or ThresholdError saying how to make one."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise ThresholdError(f"no threshold file at {path}; make one with "
                             f"`python calibrate.py --ckpt CKPT_DIR --data TEXT_FILE --sparsity 0.5`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ThresholdError(f"{path} is not a readable safetensors file ({e}); calibrate again") from None
    if meta.get("format") != FORMAT:
        raise ThresholdError(f"{path} is not a CATS threshold file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); calibrate again with calibrate.py")
    for key, t in tensors.items():
        # A NaN or inf threshold zeroes every activation and a negative one none: garbage, or dense unawares.
        if key.startswith("sparsity_") and not (t.is_floating_point() and t.isfinite().all() and (t >= 0).all()):
            what = f"{t.dtype} values" if not t.is_floating_point() else "NaN, inf or negative values"
            raise ThresholdError(f"{path} is damaged: {key} holds {what}, not finite float thresholds >= 0; "
                                 f"calibrate again")
    return tensors, meta


def available_sparsities(path) -> list[float]:
    """The sparsity levels a threshold file holds thresholds for, ascending."""
    return held_sparsities(read_threshold_file(path)[0])


def held_sparsities(tensors: Mapping[str, Tensor]) -> list[float]:
    return sorted(float(k.removeprefix("sparsity_")) for k in tensors if k.startswith("sparsity_"))


def load_thresholds(path, sparsity: float, expect: Mapping) -> Tensor:
    """Per-layer thresholds ([n_layer] float32) for `sparsity`, after checking that the file was made for
    the model described by `expect` (e.g. model_signature(model)); ThresholdError otherwise."""
    tensors, meta = read_threshold_file(path)
    for key, want in expect.items():
        have = meta.get(key)
        want = want if isinstance(want, str) else json.dumps(want)
        if have != want:
            raise ThresholdError(f"{path} was calibrated for another model ({key}: file has {have}, this model "
                                 f"has {want}); calibrate this checkpoint with calibrate.py, or pass the file made for it")
    t = tensors.get(sparsity_key(sparsity))
    if t is None:
        held = ", ".join(f"{s:g}" for s in held_sparsities(tensors)) or "none"
        raise ThresholdError(f"{path} holds thresholds for sparsity {held}, not {sparsity:g}; run "
                             f"`python calibrate.py --ckpt CKPT_DIR --data TEXT_FILE --sparsity {sparsity:g}` "
                             f"(a new run replaces the file: list every level you want at once)")
    if "n_layer" in meta and t.shape != (int(meta["n_layer"]),):
        raise ThresholdError(f"{path} is damaged: {t.shape} thresholds for {meta['n_layer']} layers; calibrate again")
    return t
