"""Triton kernels for the CATS MLP at decode, and a plain-PyTorch reference of each.

At decode (one new token for each of B <= 8 sequences) the MLP is three matrix-vector products and
reading the weights is all the time there is. CATS zeroes the gate activation of most neurons, and a
zero gate means neuron j's row of W_up and row j of the neuron-major W_down (w_down_t = W_down.T,
[ffn, d]) are never needed. Two kernels and a small reduction:

  1. gate_up: for a block of neurons, g = SiLU(W_gate x) (dense: the mask is only known after it), the
     threshold compare, then W_up x only for the neurons some token kept: h = CATS(g) * (W_up x), fp32.
  2. down: each program takes a slice of neurons and a slice of output columns and reads only the rows
     of w_down_t whose h is nonzero for some token, writing a partial sum per neuron slice.
  3. sum_partials: adds the partial sums in a fixed order (deterministic, unlike atomics) and casts.

Masked-off loads move no bytes, so the weights read are W_gate + (1 - s) (W_up + W_down). Nothing
here syncs with the host, so the whole MLP can be captured in a CUDA graph; `cats_mlp` is a
torch.library custom op so torch.compile(fullgraph=True) captures it too.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def matvec(x, w_t, acc, FP32: tl.constexpr, USE_DOT: tl.constexpr):
    """acc [M, N] += x [M, K] @ w_t [K, N] in fp32. With USE_DOT (M, N, K >= 16) on the tensor cores,
    which also lets Triton pipeline the weight loads; otherwise a broadcast-and-sum in registers."""
    if USE_DOT:
        if INTERPRET and w_t.dtype == tl.bfloat16:
            # The CPU interpreter (numpy) has no bf16 matmul; bf16 products are exact in fp32 anyway.
            acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
        elif FP32:
            acc = tl.dot(x, w_t, acc, input_precision="ieee")  # tf32 would cost 1e-3 relative error
        else:
            acc = tl.dot(x.to(w_t.dtype), w_t, acc)
    else:
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w_t.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def gate_up_kernel(x_ptr, w_gate_ptr, w_up_ptr, thr_ptr, h_ptr, B, D, F,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP32: tl.constexpr, USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's neurons
    row_ok = rows < F
    bs = tl.arange(0, BLOCK_B)  # tokens; rows past B are masked (no bytes) and come out zero
    b_ok = bs < B
    # Gate, dense: [BLOCK_B, BLOCK_N] dot products over d.
    g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_ptr + bs[:, None] * D + ks[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_gate_ptr + rows[None, :] * D + ks[:, None], mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        g = matvec(x, w_t, g, FP32, USE_DOT)
    g = g * tl.sigmoid(g)
    keep = (tl.abs(g) > tl.load(thr_ptr)) & b_ok[:, None]  # each token its own mask
    need = (tl.max(keep.to(tl.int32), axis=0) > 0) & row_ok  # a row is read if any token keeps it
    u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if tl.max(need.to(tl.int32), axis=0) > 0:  # whole block inactive: skip the loop, not just the bytes
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(x_ptr + bs[:, None] * D + ks[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
            w_t = tl.load(w_up_ptr + rows[None, :] * D + ks[:, None], mask=need[None, :] & k_ok[:, None], other=0.0)
            u = matvec(x, w_t, u, FP32, USE_DOT)
    h = tl.where(keep, g * u, 0.0)
    tl.store(h_ptr + bs[:, None] * F + rows[None, :], h, mask=b_ok[:, None] & row_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w_down_t_ptr, part_ptr, B, D, F, ROWS_PER_PROG,
                BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                FP32: tl.constexpr, USE_DOT: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    col_ok = cols < D
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < B
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    j_end = tl.minimum(split * ROWS_PER_PROG + ROWS_PER_PROG, F)
    for j0 in range(split * ROWS_PER_PROG, j_end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < j_end
        h = tl.load(h_ptr + bs[:, None] * F + js[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
        need = tl.max((h != 0).to(tl.int32), axis=0) > 0
        if tl.max(need.to(tl.int32), axis=0) > 0:
            w = tl.load(w_down_t_ptr + js[:, None] * D + cols[None, :], mask=need[:, None] & col_ok[None, :], other=0.0)
            acc = matvec(h, w, acc, FP32, USE_DOT)
    tl.store(part_ptr + split * B * D + bs[:, None] * D + cols[None, :], acc, mask=b_ok[:, None] & col_ok[None, :])


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, N, SPLITS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * N + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Launch configuration. Chosen by measurement on an H200 (bench.py --sweep; see KERNEL_LOG.md): enough
# programs to keep every SM busy with loads in flight, few enough that each reads a sizeable chunk.

def gate_up_config(B: int, D: int, F: int) -> dict:
    if B == 1:
        return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3)
    return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)


def down_config(B: int, D: int, F: int) -> dict:
    block_d, block_j, programs = (256, 32, 1024) if B == 1 else (128, 16, 1024)
    splits = max(1, min(triton.cdiv(F, block_j), programs // triton.cdiv(D, block_d)))
    rows = triton.cdiv(triton.cdiv(F, splits), block_j) * block_j
    return dict(BLOCK_B=16, BLOCK_D=block_d, BLOCK_J=block_j, ROWS_PER_PROG=rows, SPLITS=triton.cdiv(F, rows),
                num_warps=4, num_stages=3)


def launch_options(c: dict, B: int, dtype) -> dict:
    """Config -> kernel keyword arguments. BLOCK_B >= 16 selects the tensor-core path (tokens padded)."""
    block_b = max(c["BLOCK_B"], triton.next_power_of_2(B))
    return dict(BLOCK_B=block_b, USE_DOT=block_b >= 16, FP32=dtype == torch.float32,
                num_warps=c["num_warps"], num_stages=c["num_stages"])


def gate_up(x: Tensor, w_gate: Tensor, w_up: Tensor, threshold: Tensor, h: Tensor = None) -> Tensor:
    """h [B, ffn] fp32 = CATS(SiLU(x W_gate^T)) * (x W_up^T), reading W_up rows only where needed."""
    B, D = x.shape
    F = w_gate.shape[0]
    h = torch.empty((B, F), device=x.device, dtype=torch.float32) if h is None else h
    c = gate_up_config(B, D, F)
    gate_up_kernel[(triton.cdiv(F, c["BLOCK_N"]),)](
        x, w_gate, w_up, threshold, h, B, D, F, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        **launch_options(c, B, x.dtype))
    return h


def down(h: Tensor, w_down_t: Tensor, part: Tensor = None) -> Tensor:
    """Partial sums [splits, B, d] fp32 of h @ w_down_t, one per slice of neurons; zero rows of h unread."""
    B, F = h.shape
    D = w_down_t.shape[1]
    c = down_config(B, D, F)
    part = torch.empty((c["SPLITS"], B, D), device=h.device, dtype=torch.float32) if part is None else part
    down_kernel[(triton.cdiv(D, c["BLOCK_D"]), c["SPLITS"])](
        h, w_down_t, part, B, D, F, c["ROWS_PER_PROG"], BLOCK_J=c["BLOCK_J"], BLOCK_D=c["BLOCK_D"],
        **launch_options(c, B, w_down_t.dtype))
    return part


def sum_partials(part: Tensor, out: Tensor) -> Tensor:
    """out [B, d] (any float dtype) = part.sum(0), added in a fixed order."""
    n = out.numel()
    sum_partials_kernel[(triton.cdiv(n, 1024),)](part, out, n, part.shape[0], BLOCK=1024)
    return out


def cats_mlp_triton(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Tensor,
                    out: Tensor = None) -> Tensor:
    B, D = x.shape
    F = w_gate.shape[0]
    if not 1 <= B <= 8:
        raise ValueError(f"the decode kernel takes 1 to 8 tokens, got {B}; use cats_mlp_reference for more")
    if not w_gate.shape == w_up.shape == w_down_t.shape == (F, D):
        raise ValueError(f"weights must all be [ffn, d] = [{F}, {D}] (w_down_t is W_down transposed)")
    if not all(t.is_contiguous() for t in (x, w_gate, w_up, w_down_t)):
        raise ValueError("x and the weights must be contiguous")
    out = torch.empty((B, D), device=x.device, dtype=x.dtype) if out is None else out
    return sum_partials(down(gate_up(x, w_gate, w_up, threshold), w_down_t), out)


# Plain-PyTorch references of the three kernels, for the tests: fp32, or fp64 when given fp64.

def gate_up_reference(x, w_gate, w_up, threshold):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    g = torch.nn.functional.silu(xf @ w_gate.to(acc).T)
    g = torch.where(g.abs() > as_threshold(threshold, x.device).to(acc), g, 0.0)
    return g * (xf @ w_up.to(acc).T)


def down_reference(h, w_down_t):
    return h @ w_down_t.to(h.dtype)


# ---------------------------------------------------------------------------------------------------
# Public entry points

def as_threshold(threshold, device) -> Tensor:
    """A float or 0-d tensor -> 0-d fp32 tensor on device (the kernel reads it there: no host sync)."""
    if isinstance(threshold, Tensor):
        return threshold.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(threshold), device=device, dtype=torch.float32)


@torch.library.custom_op("cats::mlp", mutates_args=())
def _cats_mlp_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Tensor) -> Tensor:
    return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold)


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold):
    return torch.empty_like(x)


def cats_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold) -> Tensor:
    """CATS MLP for x [B, d] (B <= 8): W_down(CATS_t(SiLU(W_gate x)) * W_up x), reading only the
    W_up rows and w_down_t rows of neurons that some token keeps. w_gate, w_up: [ffn, d];
    w_down_t: [ffn, d] (W_down transposed). fp32 accumulation; output in x's dtype."""
    return _cats_mlp_op(x, w_gate, w_up, w_down_t, as_threshold(threshold, x.device))


def cats_mlp_reference(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold) -> Tensor:
    """The same function in plain PyTorch: computed in fp32 (fp64 if given fp64), output in x's dtype."""
    return down_reference(gate_up_reference(x, w_gate, w_up, threshold), w_down_t).to(x.dtype)
