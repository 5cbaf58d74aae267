"""Triton kernels for decode (one new token for each of B <= 8 sequences), and a plain-PyTorch reference
of each: the CATS MLP, and a dense matrix-vector product for the other projections.

At decode every projection is a matrix-vector product and reading the weights is all the time there is.
CATS zeroes the gate activation of most neurons, and a zero gate means neuron j's row of W_up and row j
of the neuron-major W_down (w_down_t = W_down.T, [ffn, d]) are never needed. Two plans, by measurement
(KERNEL_LOG.md):

One token (B = 1): one pass over the neurons, reading only what is needed.
  1. mlp_kernel: for each block of 2 neurons, g = SiLU(W_gate x) (dense: the mask is only known after
     it) and the threshold compare, then the kept neurons' W_up and w_down_t rows, both contiguous
     (masked loads: a dropped neuron's rows move no bytes): h = g * (W_up[j] . x), out += h *
     w_down_t[j]. Each program owns a fixed set of blocks and writes one fp32 partial output. The loop
     is skewed so that HBM has the next blocks' rows to fetch while one block's gate is summed, and a
     block whose neurons were all dropped skips its arithmetic too (the loop issues about as many
     instructions as it waits for memory).
     (v2 masked without the skew, and its time hardly fell with sparsity; v3-v4 gathered the kept
     neurons into one list at a kernel boundary and shared them out evenly, which cost dense and CATS
     more than the skewed pass; KERNEL_LOG.md.)
  2. reduce_kernel: adds the partials in a fixed order (deterministic, unlike atomics) and casts.

Several tokens (B = 2..8): a neuron's rows are read when any token keeps it, and the union of B masks
is nearly dense (at 50% per token, 8 tokens leave under 1% of neurons unread), so there is little to
compact: gate_up_kernel computes gate and up for a block of neurons on the tensor cores (tokens padded
to 16), skipping W_up rows no token needs; down_kernel reads w_down_t rows where some h != 0, writing a
partial per slice of neurons; reduce_kernel as above. Each token keeps its own mask either way.

gemv_kernel: y = x W^T for the attention projections and the LM head at one token: persistent
programs over blocks of whole rows, whose first block is loaded before the wait for the previous
kernel (faster than cuBLAS for these shapes on the H200, see README). linear_kernel: the same for 2-8
tokens, on the tensor cores.

A decoder layer's RMSNorm is folded into the product after it (`norm_weight`) and its residual add into
the product before it (`residual`), so a decode layer is 5 kernels: q/k/v, attention, wo, mlp,
reduce. attention_kernel applies RoPE, writes the new k and v into the cache and attends over
the filled positions, one query head and one slice of the cache per program (flash-decoding); the last
program of each head to finish merges the slices.

Nothing here syncs with the host, so a decode step can be captured in a CUDA graph; `cats_mlp` and
`linear` are torch.library custom ops, so torch.compile(fullgraph=True) captures them too.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# Programmatic dependent launch (Hopper and later, on unless CATS_PDL=0): each kernel is set up while
# the one before it finishes, and waits at its start until that one's writes are visible, which hides
# part of the launch gap; a decode layer is 5 kernels of a few microseconds each. Decided once, for
# the first GPU (a host that mixes older GPUs with Hopper ones should set CATS_PDL=0).
USE_PDL = (os.environ.get("CATS_PDL", "1") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
           and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)
PDL = tl.constexpr(USE_PDL)
LAUNCH = {"launch_pdl": True} if USE_PDL else {}


@triton.jit
def wait_for_previous_kernel():
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next_kernel():
    """Let the next kernel launch now rather than when this one ends, so that it can load its first
    weights (which no kernel writes) while this one finishes; it still waits for all of this one's
    writes before it reads any of them. Called first by attention (before wo), reduce (before the next
    q/k/v, at one token) and every GEMV (wo, before the MLP; after q/k/v and the LM head it only
    launches attention or sampling early)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def dot(a, b, acc):
    """acc += a @ b on the tensor cores, fp32 accumulation; a is cast to b's dtype."""
    if INTERPRET and b.dtype == tl.bfloat16:  # the CPU interpreter (numpy) has no bf16 matmul
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")  # tf32 would cost 1e-3 relative error
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def rows_times_x(w_ptr, rows, row_ok, x_ptr, B, D, nw_ptr, eps, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32: x [B, D] times rows `rows` of w ([*, D], row-major), on the tensor cores:
    W [BLOCK_N, K] @ x^T [K, BLOCK_B], tokens padded to 16 rows. Rows not row_ok are not read (masked
    loads move no bytes) and come out 0. NORM: RMSNorm(x) with weight nw instead of x. Its 1/rms is one
    number per token, so it factors out of the sum: W (nw * x) / rms(x), and the sum of squares is
    gathered in the same pass over x."""
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < B
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    sq = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)  # squares per lane; summed once, at the end
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(w_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_t = tl.load(x_ptr + bs[None, :] * D + ks[:, None], mask=b_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
        if NORM:
            sq += x_t * x_t
            x_t = x_t * tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[:, None]
        acc = dot(w, x_t.to(w.dtype), acc)
    y = tl.trans(acc)
    if NORM:
        y = y * tl.rsqrt(tl.sum(sq, axis=0)[:, None] / D + eps)
    return y


@triton.jit
def cats(g, t, ok, SPARSE: tl.constexpr):
    """SiLU, then CATS: keep where |SiLU(g)| > t (compared in fp32); keep all where not SPARSE."""
    g = g * tl.sigmoid(g)
    keep = ((tl.abs(g) > t) & ok) if SPARSE else ok
    return tl.where(keep, g, 0.0), keep


# ---------------------------------------------------------------------------------------------------
# One token: matrix-vector products over blocks of whole rows, in persistent programs

@triton.jit
def weight_rows(w_ptr, block, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows block * BLOCK_N ... + BLOCK_N of w [N, D], whole; none past N (masked loads move no bytes)."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    return tl.load(w_ptr + rows[:, None] * D + ds[None, :], mask=(rows < N)[:, None] & (ds < D)[None, :], other=0.0)


@triton.jit
def input_vector(x_ptr, nw_ptr, eps, D, BLOCK_D: tl.constexpr, NORM: tl.constexpr):
    """x [D] in fp32; NORM: RMSNorm(x) with weight nw."""
    ds = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + ds, mask=ds < D, other=0.0).to(tl.float32)
    if NORM:
        x = x * tl.load(nw_ptr + ds, mask=ds < D, other=0.0).to(tl.float32) * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    return x


@triton.jit
def gemv_kernel(x_ptr, nw_ptr, eps, w_ptr, res_ptr, y_ptr, D, N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """y [N] = [res +] [RMSNorm](x) W^T for one token. Program p takes the blocks of BLOCK_N rows p,
    p + P, p + 2P, ... (P: a few programs an SM, so all run at once), and loads each block while it
    multiplies the one before. Its first block is loaded before the wait for the previous kernel, so
    those reads overlap that kernel's last ones instead of starting after them: a chain of GEMVs that
    each wait lost 2.4-2.9 us a kernel to the restart (KERNEL_LOG.md, session 13)."""
    release_next_kernel()
    pid, P = tl.program_id(0), tl.num_programs(0)
    w = weight_rows(w_ptr, pid, N, D, BLOCK_N, BLOCK_D)
    wait_for_previous_kernel()
    x = input_vector(x_ptr, nw_ptr, eps, D, BLOCK_D, NORM)
    for block in range(pid, tl.cdiv(N, BLOCK_N), P):
        w_next = weight_rows(w_ptr, block + P, N, D, BLOCK_N, BLOCK_D)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if RESIDUAL:
            y += tl.load(res_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)
        w = w_next


# ---------------------------------------------------------------------------------------------------
# One token: the whole MLP, a block of neurons at a time

@triton.jit
def mlp_kernel(x_ptr, nw_ptr, eps, w_gate_ptr, w_up_ptr, w_down_t_ptr, thr_ptr, part_ptr, D, F, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, NORM: tl.constexpr, SPARSE: tl.constexpr):
    """part[pid] = sum over this program's neurons j of g_j (W_up[j] . x) w_down_t[j], g = CATS(SiLU(W_gate
    x)). Program p takes the blocks of BLOCK_N neurons p, p + P, p + 2P, ... (P: a few programs an SM). For
    each block it reads the gate rows, then the W_up and w_down_t rows of the neurons the threshold kept,
    by masked loads: a dropped neuron's rows move no bytes. A block's up/down rows can only be asked for
    once its gate is known, so the loop is skewed to keep HBM busy meanwhile: it asks for block b's
    up/down rows and block b + 2's gate rows, then sums block b + 1's gate (its rows arrived during the
    last step), then finishes block b. Unskewed, a step was one round trip whatever its bytes, and the
    CATS 0.5 decode step came out longer than with v4's kernels. Skewed, a decode step was 6-7% (dense)
    and 4% (CATS 0.5) shorter than with v4's gate, compaction and up_down kernels, whose kernel boundary
    it also removes (KERNEL_LOG.md, session 17). A block whose neurons were all dropped skips the up/down
    arithmetic as well as the bytes: a step issues about as many instructions as it waits for memory, and
    the skip cut the 90% MLP's time by 18% and the CATS 0.5 decode step's by 0.4-0.6% (session 18).
    Asking for rows a step earlier does not overlap that arithmetic: ptxas counts a loop's loads on few
    scoreboards, and the first use of a row waits for every load on its scoreboard, rows asked for
    later included (session 19; `bench.py floor` times the bytes alone)."""
    pid, P = tl.program_id(0), tl.num_programs(0)
    w = weight_rows(w_gate_ptr, pid, F, D, BLOCK_N, BLOCK_D)  # weights: read before the wait
    wait_for_previous_kernel()
    w_next = weight_rows(w_gate_ptr, pid + P, F, D, BLOCK_N, BLOCK_D)
    x = input_vector(x_ptr, nw_ptr, eps, D, BLOCK_D, NORM)
    t = tl.load(thr_ptr) if SPARSE else 0.0
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    g, _ = cats(tl.sum(w.to(tl.float32) * x[None, :], axis=1), t, rows < F, SPARSE)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    block = pid
    # g, not the keep mask, is carried from step to step (triton 3.6 fails to compile a loop that carries
    # a bool tensor): g == 0 where the neuron was dropped, and a kept neuron whose g is exactly 0 adds 0
    while block < tl.cdiv(F, BLOCK_N):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = (g != 0)[:, None] & d_ok[None, :]
        w_up = tl.load(w_up_ptr + rows[:, None] * D + ds[None, :], mask=keep, other=0.0)
        w_down = tl.load(w_down_t_ptr + rows[:, None] * D + ds[None, :], mask=keep, other=0.0)
        w_after = weight_rows(w_gate_ptr, block + 2 * P, F, D, BLOCK_N, BLOCK_D)
        rows_next = rows + P * BLOCK_N
        g_next, _ = cats(tl.sum(w_next.to(tl.float32) * x[None, :], axis=1), t, rows_next < F, SPARSE)
        # all of the block dropped: skip the arithmetic too, not only the bytes (see the docstring)
        kept = tl.sum((g != 0).to(tl.int32), axis=0) > 0 if SPARSE else True
        if kept:
            h = g * tl.sum(w_up.to(tl.float32) * x[None, :], axis=1)
            acc += tl.sum(h[:, None] * w_down.to(tl.float32), axis=0)
        block, g, w_next = block + P, g_next, w_after
    tl.store(part_ptr + pid * D + ds, acc, mask=d_ok)


# ---------------------------------------------------------------------------------------------------
# Several tokens: fused gate + masked up per block of neurons, then down per slice of neurons

@triton.jit
def gate_up_kernel(x_ptr, nw_ptr, eps, w_gate_ptr, w_up_ptr, thr_ptr, h_ptr, B, D, F,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                   SPARSE: tl.constexpr):
    """h [B, F] fp32 = CATS(SiLU(x W_gate^T)) * (x W_up^T), W_up rows read only where some token keeps."""
    wait_for_previous_kernel()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < F
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < B
    g = rows_times_x(w_gate_ptr, rows, row_ok, x_ptr, B, D, nw_ptr, eps, BLOCK_N, BLOCK_B, BLOCK_K, NORM)
    t = tl.load(thr_ptr) if SPARSE else 0.0
    g, keep = cats(g, t, b_ok[:, None] & row_ok[None, :], SPARSE)  # each token its own mask
    need = tl.max(keep.to(tl.int32), axis=0) > 0
    u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if tl.max(need.to(tl.int32), axis=0) > 0:  # whole block unneeded: skip the loop, not just the bytes
        u = rows_times_x(w_up_ptr, rows, need, x_ptr, B, D, nw_ptr, eps, BLOCK_N, BLOCK_B, BLOCK_K, NORM)
    tl.store(h_ptr + bs[:, None] * F + rows[None, :], g * u, mask=b_ok[:, None] & row_ok[None, :])


@triton.jit
def down_kernel(h_ptr, w_down_t_ptr, part_ptr, B, D, F, ROWS_PER_PROG,
                BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[split] [B, BLOCK_D columns] = h[:, slice] @ w_down_t[slice], rows read only where h != 0."""
    wait_for_previous_kernel()
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
def reduce_kernel(part_ptr, res_ptr, out_ptr, N, P, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, RESIDUAL: tl.constexpr,
                  RELEASE: tl.constexpr):
    """out[n] = sum over p of part[p, n], in a fixed order (+ res[n]). [BLOCK_P, BLOCK] tiles keep many
    loads in flight: adding one partial row at a time is a chain of L2 round trips (11 us in v2).
    RELEASE (one token): the next layer's q/k/v GEMV launches early and loads its first rows meanwhile.
    At 2-8 tokens the kernel after it waits before it reads anything, so an early launch only takes
    the SMs' room from this one: cats_mlp at B = 2 took 86.5 us with it and 79.9 without (Llama-2-7B,
    dense; KERNEL_LOG.md, session 22)."""
    if RELEASE:
        release_next_kernel()
    wait_for_previous_kernel()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + ps[:, None] * N + offs[None, :], mask=(ps < P)[:, None] & ok[None, :], other=0.0)
    out = tl.sum(acc, axis=0)
    if RESIDUAL:
        out += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def linear_kernel(x_ptr, nw_ptr, eps, w_ptr, res_ptr, y_ptr, B, D, N, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_K: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """Several tokens: y = [res +] [RMSNorm](x) W^T on the tensor cores, one program per BLOCK_N rows of W,
    all of d (no split, so the residual add is a plain epilogue)."""
    wait_for_previous_kernel()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    y = rows_times_x(w_ptr, rows, ok, x_ptr, B, D, nw_ptr, eps, BLOCK_N, BLOCK_B, BLOCK_K, NORM)
    bs = tl.arange(0, BLOCK_B)
    out = bs[:, None] * N + rows[None, :]
    ok = (bs < B)[:, None] & ok[None, :]
    if RESIDUAL:
        y += tl.load(res_ptr + out, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Attention for one new token (flash-decoding): each program takes one query head and one slice of the
# cache positions, and reads only the filled positions of its slice; the head's last program merges them.

@triton.jit
def rope(ptr, i, ok, cos, sin, HALF):
    """The two halves of the head vector at ptr, rotated by RoPE, rounded to the model dtype as the
    PyTorch path rounds them. Hugging Face checkpoints pair dimension i with i + head_dim/2."""
    x1 = tl.load(ptr + i, mask=ok, other=0.0)
    x2 = tl.load(ptr + HALF + i, mask=ok, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype).to(tl.float32), (x2 * cos + x1 * sin).to(dtype).to(tl.float32)


@triton.jit
def attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, inv_freq_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
                     y_ptr, S, CHUNK, WINDOW, scale, N_HEAD: tl.constexpr, N_KV: tl.constexpr, HD: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """For query head bh (= b * N_HEAD + head) and cache positions [split * CHUNK, +CHUNK): RoPE on q
    and on the new k, softmax(q K^T * scale) V over the positions this token may see, written as an
    unnormalised partial (row max m, sum l, acc), which whichever of the head's programs finishes last
    merges into y (count_ptr: one arrival counter per head). The new token's k and v are also written
    into the cache, at position pos, by the first query head of their group; the other programs take
    them from qkv rather than from the cache, so no program reads a slot that another is writing.
    Unlike the GEMVs it reads nothing before its wait: the cached slots could be read then, but the
    tile held across the wait spilled registers (decode 8-10% slower), and with tiles of 32 positions
    (no more spills than now) it gained nothing (KERNEL_LOG.md, session 14)."""
    release_next_kernel()  # wo
    wait_for_previous_kernel()
    bh, split = tl.program_id(0), tl.program_id(1)
    b, head = bh // N_HEAD, bh % N_HEAD
    kv = head // (N_HEAD // N_KV)
    HALF: tl.constexpr = HD // 2
    pos = tl.load(pos_ptr)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    freq = pos.to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i_ok, other=0.0)
    cos, sin = tl.cos(freq), tl.sin(freq)
    row = qkv_ptr + b * (N_HEAD + 2 * N_KV) * HD
    q1, q2 = rope(row + head * HD, i, i_ok, cos, sin, HALF)
    k1_new, k2_new = rope(row + (N_HEAD + kv) * HD, i, i_ok, cos, sin, HALF)
    v1_new = tl.load(row + (N_HEAD + N_KV + kv) * HD + i, mask=i_ok, other=0.0)
    v2_new = tl.load(row + (N_HEAD + N_KV + kv) * HD + HALF + i, mask=i_ok, other=0.0)
    cache = (b * N_KV + kv) * S * HD
    start = split * CHUNK
    if (head % (N_HEAD // N_KV) == 0) & (start <= pos) & (pos < start + CHUNK):
        dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + cache + pos * HD + i, k1_new.to(dtype), mask=i_ok)
        tl.store(k_cache_ptr + cache + pos * HD + HALF + i, k2_new.to(dtype), mask=i_ok)
        tl.store(v_cache_ptr + cache + pos * HD + i, v1_new, mask=i_ok)
        tl.store(v_cache_ptr + cache + pos * HD + HALF + i, v2_new, mask=i_ok)
    v1_new, v2_new = v1_new.to(tl.float32), v2_new.to(tl.float32)
    lo = tl.maximum(start, pos - WINDOW + 1)  # Mistral's sliding window: keys within WINDOW tokens back
    hi = tl.minimum(start + CHUNK, pos + 1)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc1 = tl.zeros((BLOCK_HALF,), tl.float32)
    acc2 = tl.zeros((BLOCK_HALF,), tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        cached = ((s < pos) & (s < hi))[:, None] & i_ok[None, :]
        new = (s == pos)[:, None]
        at = cache + s[:, None] * HD + i[None, :]
        k1 = tl.where(new, k1_new[None, :], tl.load(k_cache_ptr + at, mask=cached, other=0.0).to(tl.float32))
        k2 = tl.where(new, k2_new[None, :], tl.load(k_cache_ptr + at + HALF, mask=cached, other=0.0).to(tl.float32))
        # V is loaded before the scores are computed, so both tiles' reads are in flight together
        v1 = tl.where(new, v1_new[None, :], tl.load(v_cache_ptr + at, mask=cached, other=0.0).to(tl.float32))
        v2 = tl.where(new, v2_new[None, :], tl.load(v_cache_ptr + at + HALF, mask=cached, other=0.0).to(tl.float32))
        score = (tl.sum(k1 * q1[None, :], axis=1) + tl.sum(k2 * q2[None, :], axis=1)) * scale
        score = tl.where(s < hi, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        p = tl.exp2(score - m_new)  # scale includes log2(e)
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, axis=0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, axis=0)
        m = m_new
    n_split = tl.num_programs(1)
    tl.store(m_ptr + bh * n_split + split, m)
    tl.store(l_ptr + bh * n_split + split, l)
    out = acc_ptr + (bh * n_split + split) * HD
    tl.store(out + i, acc1, mask=i_ok)
    tl.store(out + HALF + i, acc2, mask=i_ok)
    # The last of this head's programs to finish merges all slices, so no separate combine kernel (one
    # launch and gap fewer per layer). The barrier puts every thread's stores above before the atomic;
    # the atomic's release and acquire make them visible to that last program, which loads past L1
    # (.cg) and leaves the counter at zero for the next launch.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel") == n_split - 1:
        sp = tl.arange(0, BLOCK_SPLITS)
        sp_ok = sp < n_split
        ms = tl.load(m_ptr + bh * n_split + sp, mask=sp_ok, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(ms - tl.max(ms, axis=0))  # a slice that saw no position has m = -inf: weight 0
        l = tl.sum(weight * tl.load(l_ptr + bh * n_split + sp, mask=sp_ok, other=0.0, cache_modifier=".cg"), axis=0)
        at = acc_ptr + (bh * n_split + sp)[:, None] * HD + i[None, :]
        ok = sp_ok[:, None] & i_ok[None, :]
        y1 = tl.sum(weight[:, None] * tl.load(at, mask=ok, other=0.0, cache_modifier=".cg"), axis=0) / l
        y2 = tl.sum(weight[:, None] * tl.load(at + HALF, mask=ok, other=0.0, cache_modifier=".cg"), axis=0) / l
        dtype = y_ptr.dtype.element_ty
        tl.store(y_ptr + bh * HD + i, y1.to(dtype), mask=i_ok)
        tl.store(y_ptr + bh * HD + HALF + i, y2.to(dtype), mask=i_ok)
        tl.store(count_ptr + bh, 0)


# ---------------------------------------------------------------------------------------------------
# Launch configurations, chosen by measurement on an H200 (bench.py sweep; KERNEL_LOG.md): enough
# programs to keep every SM busy with loads in flight, few enough that each reads a sizeable chunk.

def gemv_config(D: int, N: int) -> dict:
    """gemv_kernel: blocks of 2 whole rows, 4 programs an SM of the H200's 132. What a
    kernel boundary costs (`bench.py chain`, session 13): 0.8 us for W_o and 1.5 for a W_gate of
    Llama-2-7B, where blocks of 4 rows in 264 programs of 8 warps lost 1.9 on W_gate; in one decode
    run, CATS 0.5 came out above both runs of that configuration on both 7B shapes. Up to d = 8192 a
    block is at most 16k weights, so a program holds two blocks in registers."""
    return dict(BLOCK_N=max(1, min(2, 16384 // triton.next_power_of_2(D))), programs=528, num_warps=4)


def mlp_config(D: int, F: int, sparse: bool) -> dict:
    """mlp_kernel. From d = 4096: blocks of 2 neurons (1 past d = 8192, as in gemv_config), two programs
    of 8 warps an SM (125-128 registers a thread at d = 4096). Against it in the decode step (session
    17, same process): 264 programs of 16 warps with registers capped at 64, steps 0.4-0.9% longer; 396
    programs of 8 warps with 1 neuron a block, 1.8-3.4% longer. With 16 warps uncapped (one program an
    SM) steps were 12-27% longer than with v4's kernels. Below d = 4096, as for SmolLM2-135M (d = 576,
    ffn = 1536), launch-bound, the fastest dense step (1 neuron a block, 528 programs) and the fastest
    CATS step (one block of 2 a program) differ, so each mode takes its own: the 7B configuration gave
    8% (dense) and 11% (CATS) fewer tok/s there."""
    if D >= 4096:
        return dict(gemv_config(D, F), programs=264, num_warps=8)
    if sparse:
        return dict(BLOCK_N=2, programs=triton.cdiv(F, 2), num_warps=4)
    return dict(BLOCK_N=1, programs=528, num_warps=4)


def gate_up_config(B: int, D: int, F: int) -> dict:
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)


def down_config(B: int, D: int, F: int, block_d=256, block_j=32, programs=1024) -> dict:
    """Slices of neurons (SPLITS, ROWS_PER_PROG each) so that about `programs` programs run."""
    splits = max(1, min(triton.cdiv(F, block_j), programs // triton.cdiv(D, block_d)))
    rows = triton.cdiv(triton.cdiv(F, splits), block_j) * block_j
    return dict(BLOCK_D=block_d, BLOCK_J=block_j, ROWS_PER_PROG=rows, SPLITS=triton.cdiv(F, rows),
                num_warps=4, num_stages=3)


def reduce_config(P: int, N: int) -> dict:
    """The MLP's partial rows, 64 a step: 264 of them took 2.1 us in 5 steps, 2.8 in 17; 256 in 1 or 2
    steps made decode no faster (session 16)."""
    return dict(BLOCK=16, BLOCK_P=64, num_warps=8)


def attention_config(B: int, n_head: int, S: int, block_s=64, programs=2048, num_warps=2) -> dict:
    """Slices of CHUNK positions: one tile each up to B * n_head * slices = `programs`. A program is a
    chain of dependent reads (position, then K and V), so many short ones beat a few long ones; 2 warps
    a program measured 5.9 us at position 200 and 7.5 at 1000, 4 warps 7.8 and 14.1."""
    splits = max(1, min(triton.cdiv(S, block_s), programs // (B * n_head)))
    chunk = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    return dict(BLOCK_S=block_s, CHUNK=chunk, SPLITS=triton.cdiv(S, chunk), num_warps=num_warps)


def linear_config(B: int, D: int, N: int) -> dict:
    """linear_kernel, several tokens (one token takes gemv_kernel)."""
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)


# ---------------------------------------------------------------------------------------------------
# Launchers. Each takes its output buffer optionally, so the tests can poison it before the launch.
# nw (with eps): fold RMSNorm with weight nw into the kernel's input; the kernels never read an absent
# norm weight or residual, so x stands in for their pointers then.

def persistent_programs(c: dict, N: int) -> int:
    """gemv_kernel's and mlp_kernel's grid over N rows: c's programs, or one a block if there are fewer."""
    return min(c["programs"], triton.cdiv(N, c["BLOCK_N"]))


def mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Optional[Tensor], nw=None, eps=0.0,
        part=None) -> Tensor:
    """One token: partial outputs [programs, d] fp32, one per program of mlp_kernel."""
    D, F = x.shape[-1], w_gate.shape[0]
    c = mlp_config(D, F, threshold is not None)
    programs = persistent_programs(c, F)
    part = torch.empty((programs, D), device=x.device, dtype=torch.float32) if part is None else part
    mlp_kernel[(programs,)](x, x if nw is None else nw, eps, w_gate, w_up, w_down_t, x if threshold is None else threshold,
                            part, D, F, BLOCK_N=c["BLOCK_N"], BLOCK_D=triton.next_power_of_2(D), NORM=nw is not None,
                            SPARSE=threshold is not None, num_warps=c["num_warps"], **LAUNCH)
    return part


def gate_up(x: Tensor, w_gate: Tensor, w_up: Tensor, threshold: Optional[Tensor], nw=None, eps=0.0, h: Tensor = None) -> Tensor:
    """Several tokens: h [B, ffn] fp32 = CATS(SiLU(x W_gate^T)) * (x W_up^T)."""
    B, D = x.shape
    F = w_gate.shape[0]
    h = torch.empty((B, F), device=x.device, dtype=torch.float32) if h is None else h
    c = gate_up_config(B, D, F)
    gate_up_kernel[(triton.cdiv(F, c["BLOCK_N"]),)](x, x if nw is None else nw, eps, w_gate, w_up,
                                                    x if threshold is None else threshold, h, B, D, F,
                                                    BLOCK_B=16, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                                                    NORM=nw is not None, SPARSE=threshold is not None, num_warps=c["num_warps"], num_stages=c["num_stages"], **LAUNCH)
    return h


def down(h: Tensor, w_down_t: Tensor, part: Tensor = None) -> Tensor:
    """Several tokens: partial sums [splits, B, d] fp32 of h @ w_down_t, one per slice of neurons."""
    B, F = h.shape
    D = w_down_t.shape[1]
    c = down_config(B, D, F)
    part = torch.empty((c["SPLITS"], B, D), device=h.device, dtype=torch.float32) if part is None else part
    down_kernel[(triton.cdiv(D, c["BLOCK_D"]), c["SPLITS"])](h, w_down_t, part, B, D, F, c["ROWS_PER_PROG"], BLOCK_B=16,
                                                             BLOCK_J=c["BLOCK_J"], BLOCK_D=c["BLOCK_D"],
                                                             num_warps=c["num_warps"], num_stages=c["num_stages"], **LAUNCH)
    return part


def reduce(part: Tensor, out: Tensor, residual: Tensor = None, release=False) -> Tensor:
    """out (any float dtype) = part.sum(0) (+ residual), added in a fixed order. release: let the next
    kernel launch before this one ends (one token; see reduce_kernel)."""
    N, P = out.numel(), part.shape[0]
    c = reduce_config(P, N)
    reduce_kernel[(triton.cdiv(N, c["BLOCK"]),)](part, out if residual is None else residual, out, N, P, BLOCK=c["BLOCK"],
                                                 BLOCK_P=c["BLOCK_P"], RESIDUAL=residual is not None, RELEASE=release,
                                                 num_warps=c["num_warps"], **LAUNCH)
    return out


def attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, inv_freq: Tensor, counts: Tensor,
              n_head: int, window: int, out=None) -> Tensor:
    """y [B, n_head * hd] as attention_kernel writes it (also the new k and v into the caches); out = the
    scratch (m, l, acc) per query head and slice, and y."""
    B, (_, n_kv, S, hd) = qkv.shape[0], k_cache.shape
    c = attention_config(B, n_head, S)
    m, l, acc, y = out or (torch.empty((B * n_head, c["SPLITS"]), device=qkv.device, dtype=torch.float32),
                           torch.empty((B * n_head, c["SPLITS"]), device=qkv.device, dtype=torch.float32),
                           torch.empty((B * n_head, c["SPLITS"], hd), device=qkv.device, dtype=torch.float32),
                           torch.empty((B, n_head * hd), device=qkv.device, dtype=qkv.dtype))
    attention_kernel[(B * n_head, c["SPLITS"])](qkv, k_cache, v_cache, input_pos, inv_freq, m, l, acc, counts, y, S,
                                                c["CHUNK"], window or S, 1.4426950408889634 / hd ** 0.5, N_HEAD=n_head,
                                                N_KV=n_kv, HD=hd, BLOCK_S=c["BLOCK_S"],
                                                BLOCK_HALF=triton.next_power_of_2(hd // 2),
                                                BLOCK_SPLITS=triton.next_power_of_2(c["SPLITS"]),
                                                num_warps=c["num_warps"], **LAUNCH)
    return y


def check_inputs(x: Tensor, *weights: Tensor, nw=None, residual=None) -> None:
    if not (x.dim() == 2 and 1 <= x.shape[0] <= 8):
        raise ValueError(f"the decode kernels take x of shape [B, d] with 1 to 8 tokens, got {list(x.shape)}")
    if not all(w.shape[1] == x.shape[1] for w in weights):
        raise ValueError(f"weights must be [*, d] with d = {x.shape[1]} (w_down_t is W_down transposed)")
    if nw is not None and nw.shape != (x.shape[1],):
        raise ValueError(f"the norm weight must be [d] with d = {x.shape[1]}, got {list(nw.shape)}")
    if not all(t.is_contiguous() for t in (x, *weights) + tuple(t for t in (nw, residual) if t is not None)):
        raise ValueError("x, the weights, norm weight and residual must be contiguous")


def cats_mlp_triton(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Optional[Tensor],
                    nw=None, eps=0.0, residual=None) -> Tensor:
    check_inputs(x, w_gate, w_up, w_down_t, nw=nw, residual=residual)
    if not w_gate.shape == w_up.shape == w_down_t.shape:
        raise ValueError(f"w_gate, w_up, w_down_t must all be [ffn, d], got {[list(w.shape) for w in (w_gate, w_up, w_down_t)]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"the residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    out = torch.empty_like(x)
    if x.shape[0] == 1:
        return reduce(mlp(x, w_gate, w_up, w_down_t, threshold, nw, eps), out, residual, release=True)
    return reduce(down(gate_up(x, w_gate, w_up, threshold, nw, eps), w_down_t), out, residual)


def linear_triton(x: Tensor, w: Tensor, nw=None, eps=0.0, residual=None, out=None) -> Tensor:
    check_inputs(x, w, nw=nw, residual=residual)
    B, D = x.shape
    N = w.shape[0]
    if residual is not None and residual.shape != (B, N):
        raise ValueError(f"the residual must be [B, n] = {[B, N]}, got {list(residual.shape)}")
    y = torch.empty((B, N), device=x.device, dtype=x.dtype) if out is None else out
    args = (x, x if nw is None else nw, eps, w, x if residual is None else residual, y)
    if B == 1:
        c = gemv_config(D, N)
        gemv_kernel[(persistent_programs(c, N),)](
            *args, D, N, BLOCK_N=c["BLOCK_N"], BLOCK_D=triton.next_power_of_2(D), NORM=nw is not None,
            RESIDUAL=residual is not None, num_warps=c["num_warps"], **LAUNCH)
        return y
    c = linear_config(B, D, N)
    linear_kernel[(triton.cdiv(N, c["BLOCK_N"]),)](*args, B, D, N, BLOCK_N=c["BLOCK_N"], BLOCK_B=16, BLOCK_K=c["BLOCK_K"],
                                                   NORM=nw is not None, RESIDUAL=residual is not None,
                                                   num_warps=c["num_warps"], num_stages=c["num_stages"], **LAUNCH)
    return y


def attention_triton(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, inv_freq: Tensor,
                     counts: Tensor, n_head: int, window: int) -> Tensor:
    B, (cache_b, n_kv, _, hd) = qkv.shape[0], k_cache.shape
    if not (qkv.dim() == 2 and qkv.shape[1] == (n_head + 2 * n_kv) * hd and B <= cache_b and n_head % n_kv == 0):
        raise ValueError(f"qkv must be [B, (n_head + 2 n_kv) hd] = [B, {(n_head + 2 * n_kv) * hd}] for a cache "
                         f"{list(k_cache.shape)}, got {list(qkv.shape)}")
    if not (v_cache.shape == k_cache.shape and input_pos.numel() == 1 and inv_freq.numel() == hd // 2 and hd % 2 == 0):
        raise ValueError("need v_cache shaped like k_cache, one input position and hd / 2 rope frequencies")
    if not (counts.dtype == torch.int32 and counts.numel() >= B * n_head):
        raise ValueError(f"counts must be int32 zeros, at least B * n_head = {B * n_head} of them")
    if not all(t.is_contiguous() for t in (qkv, k_cache, v_cache)):
        raise ValueError("qkv and the caches must be contiguous")
    return attention(qkv, k_cache, v_cache, input_pos, inv_freq, counts, n_head, window)


# ---------------------------------------------------------------------------------------------------
# Plain-PyTorch references of the kernels, for the tests: fp32, or fp64 when given fp64.

def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_reference(x, nw, eps):
    x = x.to(acc_dtype(x))
    return x if nw is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * nw.to(x.dtype)


def gate_reference(x, w_gate, threshold, nw=None, eps=0.0):
    """CATS(SiLU(x W_gate^T)) [B, F] and the mask of neurons some token keeps [F]."""
    g = torch.nn.functional.silu(rms_norm_reference(x, nw, eps) @ w_gate.to(acc_dtype(x)).T)
    t = as_threshold(threshold, x.device)
    keep = g.abs() > t.to(g.dtype) if t is not None else torch.ones_like(g, dtype=torch.bool)
    return torch.where(keep, g, 0.0), keep.any(0)


def gate_up_reference(x, w_gate, w_up, threshold, nw=None, eps=0.0):
    return gate_reference(x, w_gate, threshold, nw, eps)[0] * (rms_norm_reference(x, nw, eps) @ w_up.to(acc_dtype(x)).T)


def down_reference(h, w_down_t):
    return h @ w_down_t.to(h.dtype)


def linear_reference(x, w, nw=None, eps=0.0, residual=None):
    y = rms_norm_reference(x, nw, eps) @ w.to(acc_dtype(x)).T
    return y if residual is None else y + residual.to(y.dtype)


def attention_reference(qkv, k_cache, v_cache, input_pos, inv_freq, n_head, window=None):
    """What attention_triton does, step by step: RoPE on q and the new k, both caches updated at
    input_pos (in place, in their dtype), then softmax attention over the positions the token may see,
    in fp32 (fp64 when the caches are fp64). Returns [B, n_head * hd] in the accumulation dtype."""
    B, (_, n_kv, S, hd) = qkv.shape[0], k_cache.shape
    q, k, v = qkv.view(B, n_head + 2 * n_kv, hd).split([n_head, n_kv, n_kv], dim=1)
    freq = input_pos.to(inv_freq.dtype) * inv_freq
    cos, sin = torch.cat([freq.cos(), freq.cos()]).to(acc_dtype(qkv)), torch.cat([freq.sin(), freq.sin()]).to(acc_dtype(qkv))
    rotate = lambda t: (t.to(cos.dtype) * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1).to(cos.dtype) * sin).to(t.dtype)  # noqa: E731
    q, k = rotate(q), rotate(k)
    k_cache[:B, :, input_pos] = k[:, :, None]
    v_cache[:B, :, input_pos] = v[:, :, None]
    keys = torch.arange(S, device=qkv.device)
    pos = input_pos.reshape(())
    seen = (keys <= pos) & ((pos - keys < window) if window else True)
    kk = k_cache[:B, :, seen].to(acc_dtype(qkv)).repeat_interleave(n_head // n_kv, dim=1)  # [B, n_head, s, hd]
    vv = v_cache[:B, :, seen].to(acc_dtype(qkv)).repeat_interleave(n_head // n_kv, dim=1)
    p = torch.softmax((kk @ q.to(kk.dtype)[..., None]).squeeze(-1) / hd ** 0.5, dim=-1)
    return (p[:, :, None, :] @ vv).reshape(B, n_head * hd)


# ---------------------------------------------------------------------------------------------------
# Public entry points

def as_threshold(threshold, device) -> Optional[Tensor]:
    """A float or 0-d tensor -> 0-d fp32 tensor on device (the kernel reads it there: no host sync).
    None stays None: dense, every neuron kept (a constant made here would cost a launch per layer in a
    compiled decode step)."""
    if threshold is None:
        return None
    if isinstance(threshold, Tensor):
        return threshold.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(threshold), device=device, dtype=torch.float32)


@torch.library.custom_op("cats::mlp", mutates_args=())
def _cats_mlp_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Optional[Tensor],
                 nw: Optional[Tensor], eps: float, residual: Optional[Tensor]) -> Tensor:
    return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, nw, eps, residual)


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, nw, eps, residual):
    return torch.empty_like(x)


@torch.library.custom_op("cats::linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, nw: Optional[Tensor], eps: float, residual: Optional[Tensor]) -> Tensor:
    return linear_triton(x, w, nw, eps, residual)


@_linear_op.register_fake
def _(x, w, nw, eps, residual):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("cats::attention", mutates_args=("k_cache", "v_cache", "counts"))
def _attention_op(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, inv_freq: Tensor, counts: Tensor,
                  n_head: int, window: int) -> Tensor:
    return attention_triton(qkv, k_cache, v_cache, input_pos, inv_freq, counts, n_head, window)


@_attention_op.register_fake
def _(qkv, k_cache, v_cache, input_pos, inv_freq, counts, n_head, window):
    return qkv.new_empty((qkv.shape[0], n_head * k_cache.shape[-1]))


def cats_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold, norm_weight=None, eps=1e-5,
             residual=None) -> Tensor:
    """CATS MLP for x [B, d] (B <= 8): W_down(CATS_t(SiLU(W_gate x)) * W_up x), reading only the
    W_up rows and w_down_t rows of neurons that some token keeps. w_gate, w_up: [ffn, d];
    w_down_t: [ffn, d] (W_down transposed); threshold: float, 0-d tensor, or None (dense).
    With norm_weight, x is RMSNorm(x) first; with residual, it is added to the result (a decoder
    layer's `h + mlp(norm(h))` in one call). fp32 accumulation; output in x's dtype."""
    return _cats_mlp_op(x, w_gate, w_up, w_down_t, as_threshold(threshold, x.device), norm_weight, eps, residual)


def cats_mlp_reference(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold, nw=None, eps=0.0,
                       residual=None) -> Tensor:
    """The same function in plain PyTorch: computed in fp32 (fp64 if given fp64), output in x's dtype."""
    y = down_reference(gate_up_reference(x, w_gate, w_up, threshold, nw, eps), w_down_t)
    return (y if residual is None else y + residual.to(y.dtype)).to(x.dtype)


def linear(x: Tensor, w: Tensor, norm_weight=None, eps=1e-5, residual=None) -> Tensor:
    """x [B, d] (B <= 8) @ w [n, d]^T, fp32 accumulation, output in x's dtype: F.linear for decode.
    With norm_weight, RMSNorm(x) in place of x; with residual ([B, n]), residual + the product."""
    return _linear_op(x, w, norm_weight, eps, residual)


def decode_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, inv_freq: Tensor,
                     n_head: int, window=None, counts=None) -> Tensor:
    """Attention for one new token per sequence, RoPE and the cache update included. qkv: [B, (n_head +
    2 n_kv) hd], the fused q, k, v projections, before RoPE; k_cache, v_cache: [B', n_kv, S, hd] (B' >=
    B), written at input_pos ([1], on the device); inv_freq: [hd / 2] RoPE frequencies (fp32); window:
    Mistral's sliding window, or None. Reads only the cache positions this token may see. Returns
    [B, n_head * hd] in qkv's dtype. counts: int32 zeros, B * n_head of them, that the kernel uses and
    leaves at zero; a decode loop keeps one and passes it every step (else each call makes one: a fill)."""
    if counts is None:
        counts = torch.zeros(qkv.shape[0] * n_head, device=qkv.device, dtype=torch.int32)
    return _attention_op(qkv, k_cache, v_cache, input_pos, inv_freq, counts, n_head, window or 0)
