"""Triton kernels for decode (one new token for each of B <= 8 sequences), and a plain-PyTorch reference
of each: the CATS MLP, and a dense matrix-vector product for the other projections.

At decode every projection is a matrix-vector product and reading the weights is all the time there is.
CATS zeroes the gate activation of most neurons, and a zero gate means neuron j's row of W_up and row j
of the neuron-major W_down (w_down_t = W_down.T, [ffn, d]) are never needed. Two plans, by measurement
(KERNEL_LOG.md):

One token (B = 1): compact, then read only what is needed.
  1. gate_kernel: g = SiLU(W_gate x) for a block of neurons (dense: the mask is only known after it),
     the threshold compare, and the block's list of kept neurons with its count.
  2. up_down_kernel: every program takes an equal share of all kept neurons (a prefix sum of the block
     counts, done in each program: no host sync, no extra launch) and for each reads its W_up row and
     w_down_t row, both contiguous: h = g * (W_up[j] . x), then out += h * w_down_t[j]. One fp32
     partial output per program. (v2 masked the inactive neurons' loads instead: its time hardly fell
     with sparsity; KERNEL_LOG.md.)
  3. reduce_kernel: adds the partials in a fixed order (deterministic, unlike atomics) and casts.

Several tokens (B = 2..8): a neuron's rows are read when any token keeps it, and the union of B masks
is nearly dense (at 50% per token, 8 tokens leave under 1% of neurons unread), so there is little to
compact: gate_up_kernel computes gate and up for a block of neurons on the tensor cores (tokens padded
to 16), skipping W_up rows no token needs; down_kernel reads w_down_t rows where some h != 0, writing a
partial per slice of neurons; reduce_kernel as above. Each token keeps its own mask either way.

linear_kernel: y = x W^T for the attention projections and the LM head at decode (same GEMV code as the
gate; faster than cuBLAS for these shapes on the H200, see README).

Nothing here syncs with the host, so a decode step can be captured in a CUDA graph; `cats_mlp` and
`linear` are torch.library custom ops, so torch.compile(fullgraph=True) captures them too.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot(a, b, acc):
    """acc += a @ b on the tensor cores, fp32 accumulation; a is cast to b's dtype."""
    if INTERPRET and b.dtype == tl.bfloat16:  # the CPU interpreter (numpy) has no bf16 matmul
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")  # tf32 would cost 1e-3 relative error
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def rows_times_x(w_ptr, rows, row_ok, x_ptr, B, D, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: x [B, D] times rows `rows` of w ([*, D], row-major). Rows not row_ok
    are not read (masked loads move no bytes) and come out 0."""
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < B
    if USE_DOT:  # W [BLOCK_N, K] @ x^T [K, BLOCK_B], tokens padded to 16 rows (masked: no bytes)
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            w = tl.load(w_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x_t = tl.load(x_ptr + bs[None, :] * D + ks[:, None], mask=b_ok[None, :] & k_ok[:, None], other=0.0)
            acc = dot(w, x_t.to(w.dtype), acc)
        return tl.trans(acc)
    else:  # one token, no tensor cores: products accumulate per lane, one reduction at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            w = tl.load(w_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return tl.sum(acc, axis=1)[None, :]


@triton.jit
def cats(g, thr_ptr, ok):
    """SiLU, then CATS: keep where |SiLU(g)| > t (compared in fp32)."""
    g = g * tl.sigmoid(g)
    keep = (tl.abs(g) > tl.load(thr_ptr)) & ok
    return tl.where(keep, g, 0.0), keep


# ---------------------------------------------------------------------------------------------------
# One token: gate + compaction, then up and down over the kept neurons only

@triton.jit
def gate_kernel(x_ptr, w_gate_ptr, thr_ptr, g_ptr, idx_ptr, cnt_ptr, D, F, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """g [F] fp32 = CATS(SiLU(W_gate x)); idx[pid*BLOCK_N ...] = this block's kept neurons, in order;
    cnt[pid] = how many."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < F
    g = rows_times_x(w_gate_ptr, rows, row_ok, x_ptr, 1, D, BLOCK_N, 1, BLOCK_K, False)
    g, keep = cats(tl.reshape(g, (BLOCK_N,)), thr_ptr, row_ok)
    tl.store(g_ptr + rows, g, mask=row_ok)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + pid * BLOCK_N + pos, rows, mask=keep)
    tl.store(cnt_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def kept_neurons(pos, ok, counts, ends, idx_ptr, GATE_N: tl.constexpr):
    """Neuron ids at positions pos of the list of all kept neurons, which gate_kernel left as one list
    per block (block b: idx[b * GATE_N :][: counts[b]]); ends = inclusive prefix sum of counts."""
    before = ends[None, :] <= pos[:, None]  # [J, blocks]: the blocks wholly before pos
    block = tl.sum(before.to(tl.int32), axis=1)
    start = tl.sum(tl.where(before, counts[None, :], 0), axis=1)
    return tl.load(idx_ptr + block * GATE_N + pos - start, mask=ok, other=0)


@triton.jit
def up_down_kernel(x_ptr, w_up_ptr, w_down_t_ptr, g_ptr, idx_ptr, cnt_ptr, part_ptr, D, NB,
                   BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr, GATE_N: tl.constexpr):
    """part[pid] = sum over this program's share of kept neurons j of g_j (W_up[j] . x) w_down_t[j]."""
    blocks = tl.arange(0, BLOCK_NB)
    counts = tl.load(cnt_ptr + blocks, mask=blocks < NB, other=0)
    ends = tl.cumsum(counts, axis=0)
    total = tl.sum(counts, axis=0)
    lo = tl.program_id(0) * total // tl.num_programs(0)
    hi = (tl.program_id(0) + 1) * total // tl.num_programs(0)
    ds = tl.arange(0, BLOCK_D)  # the whole row: one program owns all d outputs of its neurons
    d_ok = ds < D
    x = tl.load(x_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    js = tl.arange(0, BLOCK_J)
    j = kept_neurons(lo + js, lo + js < hi, counts, ends, idx_ptr, GATE_N)
    for p0 in range(lo, hi, BLOCK_J):
        ok = p0 + js < hi
        w_up = tl.load(w_up_ptr + j[:, None] * D + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        w_down = tl.load(w_down_t_ptr + j[:, None] * D + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(g_ptr + j, mask=ok, other=0.0)
        # the next ids while this tile's rows are in flight (loading the next rows too, into registers,
        # measured 3 us slower: KERNEL_LOG.md)
        j_next = kept_neurons(p0 + BLOCK_J + js, p0 + BLOCK_J + js < hi, counts, ends, idx_ptr, GATE_N)
        h = g * tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
        acc += tl.sum(h[:, None] * w_down.to(tl.float32), axis=0)
        j = j_next
    tl.store(part_ptr + tl.program_id(0) * D + ds, acc, mask=d_ok)


# ---------------------------------------------------------------------------------------------------
# Several tokens: fused gate + masked up per block of neurons, then down per slice of neurons

@triton.jit
def gate_up_kernel(x_ptr, w_gate_ptr, w_up_ptr, thr_ptr, h_ptr, B, D, F,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h [B, F] fp32 = CATS(SiLU(x W_gate^T)) * (x W_up^T), W_up rows read only where some token keeps."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < F
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < B
    g = rows_times_x(w_gate_ptr, rows, row_ok, x_ptr, B, D, BLOCK_N, BLOCK_B, BLOCK_K, True)
    g, keep = cats(g, thr_ptr, b_ok[:, None] & row_ok[None, :])  # each token its own mask
    need = tl.max(keep.to(tl.int32), axis=0) > 0
    u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if tl.max(need.to(tl.int32), axis=0) > 0:  # whole block unneeded: skip the loop, not just the bytes
        u = rows_times_x(w_up_ptr, rows, need, x_ptr, B, D, BLOCK_N, BLOCK_B, BLOCK_K, True)
    tl.store(h_ptr + bs[:, None] * F + rows[None, :], g * u, mask=b_ok[:, None] & row_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w_down_t_ptr, part_ptr, B, D, F, ROWS_PER_PROG,
                BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[split] [B, BLOCK_D columns] = h[:, slice] @ w_down_t[slice], rows read only where h != 0."""
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
            acc = dot(h, w, acc)
    tl.store(part_ptr + split * B * D + bs[:, None] * D + cols[None, :], acc, mask=b_ok[:, None] & col_ok[None, :])


@triton.jit
def reduce_kernel(part_ptr, out_ptr, N, P, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n] = sum over p of part[p, n], in a fixed order. [BLOCK_P, BLOCK] tiles keep many loads in
    flight: adding one partial row at a time is a chain of L2 round trips (11 us in v2)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + ps[:, None] * N + offs[None, :], mask=(ps < P)[:, None] & ok[None, :], other=0.0)
    tl.store(out_ptr + offs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def linear_kernel(x_ptr, w_ptr, y_ptr, B, D, N, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    y = rows_times_x(w_ptr, rows, ok, x_ptr, B, D, BLOCK_N, BLOCK_B, BLOCK_K, USE_DOT)
    bs = tl.arange(0, BLOCK_B)
    tl.store(y_ptr + bs[:, None] * N + rows[None, :], y.to(y_ptr.dtype.element_ty), mask=(bs < B)[:, None] & ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configurations, chosen by measurement on an H200 (bench.py sweep; KERNEL_LOG.md): enough
# programs to keep every SM busy with loads in flight, few enough that each reads a sizeable chunk.

def gate_config(D: int, F: int) -> dict:
    return dict(BLOCK_N=16, BLOCK_K=256, num_warps=4)


def up_down_config(D: int, F: int) -> dict:
    return dict(BLOCK_J=2, programs=264, num_warps=4 if D <= 4096 else 8)


def gate_up_config(B: int, D: int, F: int) -> dict:
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)


def down_config(B: int, D: int, F: int, block_d=256, block_j=32, programs=1024) -> dict:
    """Slices of neurons (SPLITS, ROWS_PER_PROG each) so that about `programs` programs run."""
    splits = max(1, min(triton.cdiv(F, block_j), programs // triton.cdiv(D, block_d)))
    rows = triton.cdiv(triton.cdiv(F, splits), block_j) * block_j
    return dict(BLOCK_D=block_d, BLOCK_J=block_j, ROWS_PER_PROG=rows, SPLITS=triton.cdiv(F, rows),
                num_warps=4, num_stages=3)


def reduce_config(P: int, N: int) -> dict:
    return dict(BLOCK=32, BLOCK_P=16, num_warps=8)


def linear_config(B: int, D: int, N: int) -> dict:
    if B == 1 and N <= 6144:  # few rows: small blocks, so every SM gets several programs
        return dict(BLOCK_N=4 if N <= 4096 else 8, BLOCK_K=512, num_warps=4, num_stages=1, USE_DOT=False)
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, USE_DOT=True)


# ---------------------------------------------------------------------------------------------------
# Launchers. Each takes its output buffer optionally, so the tests can poison it before the launch.

def gate(x: Tensor, w_gate: Tensor, threshold: Tensor, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """One token: (g [F] fp32, idx, cnt) as gate_kernel writes them."""
    D, F = x.shape[-1], w_gate.shape[0]
    c = gate_config(D, F)
    nb = triton.cdiv(F, c["BLOCK_N"])
    g, idx, cnt = out or (torch.empty(F, device=x.device, dtype=torch.float32),
                          torch.empty(nb * c["BLOCK_N"], device=x.device, dtype=torch.int32),
                          torch.empty(nb, device=x.device, dtype=torch.int32))
    gate_kernel[(nb,)](x, w_gate, threshold, g, idx, cnt, D, F, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                       num_warps=c["num_warps"])
    return g, idx, cnt


def up_down(x: Tensor, w_up: Tensor, w_down_t: Tensor, g: Tensor, idx: Tensor, cnt: Tensor, part=None) -> Tensor:
    """One token: partial outputs [programs, d] fp32 over the kept neurons."""
    D, F = x.shape[-1], w_up.shape[0]
    c = up_down_config(D, F)
    part = torch.empty((c["programs"], D), device=x.device, dtype=torch.float32) if part is None else part
    up_down_kernel[(c["programs"],)](x, w_up, w_down_t, g, idx, cnt, part, D, cnt.numel(), BLOCK_J=c["BLOCK_J"],
                                     BLOCK_D=triton.next_power_of_2(D), BLOCK_NB=triton.next_power_of_2(cnt.numel()),
                                     GATE_N=idx.numel() // cnt.numel(), num_warps=c["num_warps"])
    return part


def gate_up(x: Tensor, w_gate: Tensor, w_up: Tensor, threshold: Tensor, h: Tensor = None) -> Tensor:
    """Several tokens: h [B, ffn] fp32 = CATS(SiLU(x W_gate^T)) * (x W_up^T)."""
    B, D = x.shape
    F = w_gate.shape[0]
    h = torch.empty((B, F), device=x.device, dtype=torch.float32) if h is None else h
    c = gate_up_config(B, D, F)
    gate_up_kernel[(triton.cdiv(F, c["BLOCK_N"]),)](x, w_gate, w_up, threshold, h, B, D, F, BLOCK_B=16,
                                                    BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                                                    num_warps=c["num_warps"], num_stages=c["num_stages"])
    return h


def down(h: Tensor, w_down_t: Tensor, part: Tensor = None) -> Tensor:
    """Several tokens: partial sums [splits, B, d] fp32 of h @ w_down_t, one per slice of neurons."""
    B, F = h.shape
    D = w_down_t.shape[1]
    c = down_config(B, D, F)
    part = torch.empty((c["SPLITS"], B, D), device=h.device, dtype=torch.float32) if part is None else part
    down_kernel[(triton.cdiv(D, c["BLOCK_D"]), c["SPLITS"])](h, w_down_t, part, B, D, F, c["ROWS_PER_PROG"], BLOCK_B=16,
                                                             BLOCK_J=c["BLOCK_J"], BLOCK_D=c["BLOCK_D"],
                                                             num_warps=c["num_warps"], num_stages=c["num_stages"])
    return part


def reduce(part: Tensor, out: Tensor) -> Tensor:
    """out (any float dtype) = part.sum(0), added in a fixed order."""
    N, P = out.numel(), part.shape[0]
    c = reduce_config(P, N)
    reduce_kernel[(triton.cdiv(N, c["BLOCK"]),)](part, out, N, P, BLOCK=c["BLOCK"], BLOCK_P=c["BLOCK_P"],
                                                 num_warps=c["num_warps"])
    return out


def check_inputs(x: Tensor, *weights: Tensor) -> None:
    if not (x.dim() == 2 and 1 <= x.shape[0] <= 8):
        raise ValueError(f"the decode kernels take x of shape [B, d] with 1 to 8 tokens, got {list(x.shape)}")
    if not all(w.shape[1] == x.shape[1] for w in weights):
        raise ValueError(f"weights must be [*, d] with d = {x.shape[1]} (w_down_t is W_down transposed)")
    if not all(t.is_contiguous() for t in (x, *weights)):
        raise ValueError("x and the weights must be contiguous")


def cats_mlp_triton(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Tensor) -> Tensor:
    check_inputs(x, w_gate, w_up, w_down_t)
    if not w_gate.shape == w_up.shape == w_down_t.shape:
        raise ValueError(f"w_gate, w_up, w_down_t must all be [ffn, d], got {[list(w.shape) for w in (w_gate, w_up, w_down_t)]}")
    out = torch.empty_like(x)
    if x.shape[0] == 1:
        return reduce(up_down(x, w_up, w_down_t, *gate(x, w_gate, threshold)), out)
    return reduce(down(gate_up(x, w_gate, w_up, threshold), w_down_t), out)


def linear_triton(x: Tensor, w: Tensor) -> Tensor:
    check_inputs(x, w)
    B, D = x.shape
    N = w.shape[0]
    y = torch.empty((B, N), device=x.device, dtype=x.dtype)
    c = linear_config(B, D, N)
    use_dot = B > 1 or c["USE_DOT"]
    linear_kernel[(triton.cdiv(N, c["BLOCK_N"]),)](x, w, y, B, D, N, BLOCK_N=c["BLOCK_N"], BLOCK_B=16 if use_dot else 1,
                                                   BLOCK_K=c["BLOCK_K"], USE_DOT=use_dot, num_warps=c["num_warps"],
                                                   num_stages=c["num_stages"])
    return y


# ---------------------------------------------------------------------------------------------------
# Plain-PyTorch references of the kernels, for the tests: fp32, or fp64 when given fp64.

def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gate_reference(x, w_gate, threshold):
    """CATS(SiLU(x W_gate^T)) [B, F] and the mask of neurons some token keeps [F]."""
    g = torch.nn.functional.silu(x.to(acc_dtype(x)) @ w_gate.to(acc_dtype(x)).T)
    keep = g.abs() > as_threshold(threshold, x.device).to(g.dtype)
    return torch.where(keep, g, 0.0), keep.any(0)


def gate_up_reference(x, w_gate, w_up, threshold):
    return gate_reference(x, w_gate, threshold)[0] * (x.to(acc_dtype(x)) @ w_up.to(acc_dtype(x)).T)


def down_reference(h, w_down_t):
    return h @ w_down_t.to(h.dtype)


def linear_reference(x, w):
    return (x.to(acc_dtype(x)) @ w.to(acc_dtype(x)).T)


# ---------------------------------------------------------------------------------------------------
# Public entry points

def as_threshold(threshold, device) -> Tensor:
    """A float or 0-d tensor -> 0-d fp32 tensor on device (the kernel reads it there: no host sync).
    None means dense: -inf keeps every neuron."""
    if threshold is None:
        threshold = float("-inf")
    if isinstance(threshold, Tensor):
        return threshold.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(threshold), device=device, dtype=torch.float32)


@torch.library.custom_op("cats::mlp", mutates_args=())
def _cats_mlp_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Tensor) -> Tensor:
    return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold)


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold):
    return torch.empty_like(x)


@torch.library.custom_op("cats::linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor) -> Tensor:
    return linear_triton(x, w)


@_linear_op.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


def cats_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold) -> Tensor:
    """CATS MLP for x [B, d] (B <= 8): W_down(CATS_t(SiLU(W_gate x)) * W_up x), reading only the
    W_up rows and w_down_t rows of neurons that some token keeps. w_gate, w_up: [ffn, d];
    w_down_t: [ffn, d] (W_down transposed); threshold: float, 0-d tensor, or None (dense).
    fp32 accumulation; output in x's dtype."""
    return _cats_mlp_op(x, w_gate, w_up, w_down_t, as_threshold(threshold, x.device))


def cats_mlp_reference(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold) -> Tensor:
    """The same function in plain PyTorch: computed in fp32 (fp64 if given fp64), output in x's dtype."""
    return down_reference(gate_up_reference(x, w_gate, w_up, threshold), w_down_t).to(x.dtype)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x [B, d] (B <= 8) @ w [n, d]^T, fp32 accumulation, output in x's dtype: F.linear for decode."""
    return _linear_op(x, w)
