"""Benchmarks on a CUDA GPU, with random weights of a named shape (no checkpoint needed).

    python bench.py mlp                  # MLP: cuBLAS dense vs cats_mlp, sparsity 0-0.9, batch 1-8
    python bench.py linear               # kernel.linear vs cuBLAS for the other decode projections
    python bench.py chain                # what a kernel boundary costs a chain of one-token GEMVs
    python bench.py floor                # one-token cats_mlp vs only reading its bytes (masks known)
    python bench.py decode               # whole model: tok/s dense vs CATS 0.5 / 0.7, 256 tokens
    python bench.py decode --ckpt DIR    # the same on a real checkpoint
    CATS_PDL=0 python bench.py profile   # where a compiled decode step's time goes, kernel by kernel
    python bench.py sweep                # launch configurations of the two kernels (see kernel.py)
    python bench.py check                # cats_mlp vs an fp64 reference on the GPU, all dtypes

Timing: CUDA graphs (triton.testing.do_bench_cudagraph), median, after warm-up; every ratio in a
table is measured in the same run. Bandwidth limits use the read rate of one big sum, measured first.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernel
from generate import read_bandwidth
from kernel import cats_mlp, cats_mlp_reference, linear, linear_reference
from model import CheckpointError, ModelArgs, Transformer, check_writable, read_args

CONFIG_FUNCTIONS = ("mlp_config", "reduce_config", "gate_up_config", "down_config")
DEFAULTS = {fn_name: getattr(kernel, fn_name) for fn_name in CONFIG_FUNCTIONS}  # kernel.py's own choices

# (d, ffn, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
}


def bench_us(fn, rep=200) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def ceilings() -> float:
    """Print the device-to-device copy rate (read + write) and the read rate of a big sum; return the
    read rate in bytes/s: weights are only read, so that is the ceiling for a decode step."""
    a = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    copy = 2 * a.numel() * 2 / (bench_us(lambda: b.copy_(a)) * 1e-6)
    read = read_bandwidth("cuda")
    print(f"ceilings: device-to-device copy {copy / 1e9:.0f} GB/s (read + write), read {read / 1e9:.0f} GB/s")
    return read


def rotating(fn, copies):
    """One call per weight copy, so no launch finds the previous launch's weights in L2 (50 MB on
    an H200); time it with bench_us and divide by len(copies)."""
    def run():
        for c in copies:
            fn(*c)
    return run


N_COPIES = 4


def random_mlp(d, ffn, dtype=torch.bfloat16, device="cuda"):
    torch.manual_seed(0)  # copies are equal, at other addresses: one threshold gives every copy one mask
    w_gate = torch.randn(ffn, d, device=device, dtype=dtype) / d ** 0.5
    w_up = torch.randn(ffn, d, device=device, dtype=dtype) / d ** 0.5
    w_down_t = torch.randn(ffn, d, device=device, dtype=dtype) / ffn ** 0.5
    return w_gate, w_up, w_down_t


def gate_magnitudes(x, w_gate) -> torch.Tensor:
    """|SiLU(W_gate x)| [B, ffn], what the threshold is compared with."""
    return F.silu(x.float() @ w_gate.float().T).abs()


def threshold_for(x, w_gate, sparsity) -> torch.Tensor:
    """The sparsity-quantile of the actual |SiLU(W_gate x)| (pooled over the batch's tokens)."""
    g = gate_magnitudes(x, w_gate).flatten()
    if sparsity == 0:
        return torch.tensor(-1.0, device=x.device)  # below every |g|: nothing skipped
    return torch.quantile(g[torch.randperm(g.numel(), device=g.device)[:2 ** 24]], sparsity).float()


def rows_needed(x, w_gate, t) -> float:
    """Fraction of neurons whose W_up / W_down rows some token needs."""
    return (gate_magnitudes(x, w_gate) > t).any(0).float().mean().item()


def bench_mlp(args):
    bw = ceilings()
    print(f"{'shape':<11} {'B':>2} {'target':>6} {'skipped':>7} {'dense us':>9} {'dense_t us':>10} {'cats us':>8} "
          f"{'x dense':>7} {'limit x':>7} {'GB/s':>6} {'% of read':>9}")
    print("(skipped: fraction of neurons no token keeps, whose W_up/W_down rows are not read; limit x: the best "
          "ratio to dense for the bytes skipped, 3 / (1 + 2 (1 - skipped)); GB/s: bytes needed / time; % of read: "
          "that over the read ceiling)")
    rows = []
    for name in args.shapes:
        d, ffn = SHAPES[name][:2]
        ws = [random_mlp(d, ffn) for _ in range(N_COPIES)]
        w_gate = ws[0][0]
        ws_std = [(g, u, dt.T.contiguous()) for g, u, dt in ws]  # cuBLAS baseline: usual [d, ffn] W_down
        n = len(ws)
        for B in args.batch:
            x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
            dense = bench_us(rotating(lambda g, u, dn: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn), ws_std)) / n
            dense_t = bench_us(rotating(lambda g, u, dt: (F.silu(F.linear(x, g)) * F.linear(x, u)) @ dt, ws)) / n
            for s in args.sparsity:
                t = threshold_for(x, w_gate, s)  # same gate weights in every copy: same mask
                need = rows_needed(x, w_gate, t)
                us = bench_us(rotating(lambda g, u, dt: cats_mlp(x, g, u, dt, t), ws)) / n
                nbytes = d * ffn * 2 * (1 + 2 * need)
                limit = 3 / (1 + 2 * need)  # best possible speedup over reading all three matrices
                rows.append((name, B, s, need, dense, dense_t, us))
                print(f"{name:<11} {B:>2} {s:>6.2f} {1 - need:>7.3f} {dense:>9.1f} {dense_t:>10.1f} {us:>8.1f} "
                      f"{dense / us:>7.3f} {limit:>7.3f} {nbytes / us / 1e3:>6.0f} {100 * nbytes / us / 1e3 / (bw / 1e9):>8.1f}%")
    return rows


SWEEP_GRIDS = {  # config function -> candidates; B = 1 uses the first two, B > 1 the next two
    "mlp_config": [dict(BLOCK_N=n, programs=p, num_warps=w) for n, p, w in
                   [(2, 264, 8), (1, 396, 8), (2, 396, 8), (1, 264, 8), (2, 264, 4), (2, 132, 16)]],
    "reduce_config": [dict(BLOCK=b, BLOCK_P=p, num_warps=w) for b, p, w in [(32, 16, 8), (64, 64, 4), (32, 64, 8)]],
    "gate_up_config": [dict(BLOCK_N=n, BLOCK_K=k, num_warps=4, num_stages=st) for n, k, st in
                       [(32, 128, 4), (64, 128, 4), (32, 256, 3), (64, 256, 3), (128, 128, 4)]],
    "down_config": [dict(BLOCK_D=bd, BLOCK_J=bj, programs=p) for bd, bj, p in
                    [(128, 16, 1024), (128, 32, 1024), (256, 32, 1024), (128, 16, 2048), (256, 16, 512)]],
}


def bench_sweep(args):
    """Time the whole cats_mlp over launch configurations of each kernel in turn (the others at their
    current best), weights rotated through copies, at 50% sparsity; --config-out writes the best."""
    best = {}
    for name in args.shapes:
        d, ffn = SHAPES[name][:2]
        ws = [random_mlp(d, ffn) for _ in range(N_COPIES)]
        for B in args.batch:
            x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
            t = threshold_for(x, ws[0][0], 0.5)
            run = rotating(lambda g, u, dt: kernel.cats_mlp_triton(x, g, u, dt, t), ws)
            chosen = {}
            for fn_name in (["mlp_config", "reduce_config"] if B == 1 else
                            ["gate_up_config", "down_config", "reduce_config"]):
                results = []
                for c in SWEEP_GRIDS[fn_name]:
                    setattr(kernel, fn_name, configured(fn_name, c))
                    results.append((time_or_inf(run), c))
                results.sort(key=lambda r: r[0])
                chosen[fn_name] = results[0][1]
                setattr(kernel, fn_name, configured(fn_name, results[0][1]))
                print(f"{name} B={B} {fn_name}: best {results[0][0]:.1f} us {results[0][1]}; next "
                      + "; ".join(f"{u:.1f} {c}" for u, c in results[1:3]), flush=True)
            best[f"{name} B={B}"] = dict(chosen, us=results[0][0])
            for fn_name in chosen:  # back to kernel.py's own, for the next batch size
                setattr(kernel, fn_name, DEFAULTS[fn_name])
    if args.config_out:
        Path(args.config_out).absolute().parent.mkdir(parents=True, exist_ok=True)
        with open(args.config_out, "w") as f:
            json.dump(best, f, indent=1)


def time_or_inf(run) -> float:
    try:
        return bench_us(run, rep=50) / N_COPIES
    except triton.runtime.errors.OutOfResources:  # too much shared memory for this block shape
        return float("inf")


def configured(fn_name, c):
    """A stand-in for kernel.<fn_name> that returns c (down_config: its split count for the shape)."""
    if fn_name == "down_config":
        return lambda B, D, F: DEFAULTS["down_config"](B, D, F, c["BLOCK_D"], c["BLOCK_J"], c["programs"])
    return lambda *_: dict(c)


def use_configs(path):
    """Make cats_mlp use configurations found by `bench.py sweep`, by shape and batch size (a batch
    size not swept takes the nearest swept one; shapes not swept keep kernel.py's own)."""
    try:
        with open(path) as f:
            found = json.load(f)  # {"llama2-7b B=1": {"mlp_config": {...}, ..., "us": 59.2}, ...}
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read --config {path} ({e}); pass a file `bench.py sweep --config-out` wrote")
    if not isinstance(found, dict) or not all(isinstance(v, dict) and k.split(" B=")[0] in SHAPES
                                              and k.split(" B=")[-1].isdigit() for k, v in found.items()):
        raise SystemExit(f"error: --config {path} is not a file `bench.py sweep --config-out` wrote (keys like "
                         f"'llama2-7b B=1'); run the sweep again")
    for key, v in found.items():  # each entry's fields as this version's sweep writes them (kernels change)
        for fn_name, c in v.items():
            if fn_name != "us" and (fn_name not in SWEEP_GRIDS or not isinstance(c, dict)
                                    or set(c) != set(SWEEP_GRIDS[fn_name][0])):
                raise SystemExit(f"error: --config {path}: {key} {fn_name} is {c}, not a configuration of this "
                                 f"kernel.py (fields {sorted(SWEEP_GRIDS.get(fn_name, [{}])[0])}); run the sweep again")

    def lookup(fn_name, D, F, B):
        entries = [(abs(int(key.split(" B=")[1]) - B), v[fn_name]) for key, v in found.items()
                   if SHAPES[key.split(" B=")[0]][:2] == (D, F) and fn_name in v]
        return min(entries, key=lambda e: e[0])[1] if entries else None

    def install(fn_name, dims):
        def pick(*a):
            c = lookup(fn_name, *dims(*a))
            return DEFAULTS[fn_name](*a) if c is None else configured(fn_name, c)(*a)
        setattr(kernel, fn_name, pick)
    install("mlp_config", lambda D, F, sparse: (D, F, 1))
    install("gate_up_config", lambda B, D, F: (D, F, B))
    install("down_config", lambda B, D, F: (D, F, B))
    reduce = [v["reduce_config"] for v in found.values() if "reduce_config" in v]
    if reduce:
        kernel.reduce_config = configured("reduce_config", reduce[0])


LINEAR_SHAPES = {  # the decode matrix-vector products besides the MLP: [rows, d]
    "llama2-7b": [("wqkv", 12288, 4096), ("wo", 4096, 4096), ("output", 32000, 4096)],
    "mistral-7b": [("wqkv", 6144, 4096), ("wo", 4096, 4096), ("output", 32000, 4096)],
    "llama2-13b": [("wqkv", 15360, 5120), ("wo", 5120, 5120), ("output", 32000, 5120)],
}


def bench_linear(args):
    """kernel.linear vs cuBLAS (F.linear) for the attention projections and the LM head."""
    bw = ceilings()
    print(f"{'shape':<11} {'matrix':<7} {'B':>2} {'cuBLAS us':>9} {'triton us':>9} {'x cuBLAS':>8} {'GB/s':>6} {'% of read':>9}")
    for name in args.shapes:
        for label, n, d in LINEAR_SHAPES[name]:
            copies = [(torch.randn(n, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5,)
                      for _ in range(max(2, int(4e8 // (n * d * 2))))]  # > 400 MB in all: no L2 hits
            for B in args.batch:
                x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
                cublas = bench_us(rotating(lambda w: F.linear(x, w), copies)) / len(copies)
                ours = bench_us(rotating(lambda w: linear(x, w), copies)) / len(copies)
                gbs = n * d * 2 / ours / 1e3
                print(f"{name:<11} {label:<7} {B:>2} {cublas:>9.1f} {ours:>9.1f} {cublas / ours:>8.3f} {gbs:>6.0f} "
                      f"{100 * gbs / (bw / 1e9):>8.1f}%", flush=True)
            del copies


def bench_chain(args):
    """What a kernel boundary costs: 16 one-token GEMVs over 16 weight matrices, each launch waiting
    for the one before (as in a decode step), against one GEMV over all their rows: the same bytes,
    read in one launch."""
    bw = ceilings()
    print(f"{'shape':<11} {'matrix':<7} {'16 launches us':>14} {'1 launch us':>11} {'per boundary us':>15} {'TB/s, 16 / 1':>13}")
    for name in args.shapes:
        d, ffn = SHAPES[name][:2]
        for label, n in (("wo", d), ("w_gate", ffn)):
            w = torch.randn(16 * n, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
            x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, 16 * n, device="cuda", dtype=torch.bfloat16)
            parts, outs = w.view(16, n, d), y.view(16, n)
            chain = bench_us(lambda: [kernel.linear_triton(x, parts[i], out=outs[i][None]) for i in range(16)])
            whole = bench_us(lambda: kernel.linear_triton(x, w, out=y))
            tbs = [w.numel() * 2 / t / 1e6 for t in (chain, whole)]
            print(f"{name:<11} {label:<7} {chain:>14.1f} {whole:>11.1f} {(chain - whole) / 15:>15.2f} "
                  f"{tbs[0]:>6.2f} / {tbs[1]:.2f}  (read ceiling {bw / 1e12:.2f})", flush=True)


@triton.jit
def word_rows(w_ptr, rows, ok, D, BLOCK_W: tl.constexpr):
    """Rows `rows` (where ok) of bf16 w [*, D] as int32 words, two bf16 each."""
    ws = tl.arange(0, BLOCK_W)
    words = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rows[:, None] * (D // 2) + ws[None, :]
    return tl.load(words, mask=ok[:, None] & (ws < D // 2)[None, :], other=0)


@triton.jit
def read_rows_kernel(keep_ptr, w_gate_ptr, w_up_ptr, w_down_t_ptr, out_ptr, D, F, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """The one-token CATS MLP's reads and nothing else: every W_gate row, and the W_up and w_down_t rows
    of neurons with keep != 0 (a mask given in advance, not computed), in mlp_kernel's programs and
    blocks. Each block is asked for while the one before is folded into an OR, next to no arithmetic;
    its keep flags were loaded a step earlier still, so no load waits for another. out[pid] [BLOCK_N,
    D / 2] = the OR of every word program pid read, row by row, so that no load can be left out."""
    pid, P = tl.program_id(0), tl.num_programs(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = tl.load(keep_ptr + rows, mask=rows < F, other=0) != 0
    gate = word_rows(w_gate_ptr, rows, rows < F, D, BLOCK_W)
    up = word_rows(w_up_ptr, rows, keep, D, BLOCK_W)
    down = word_rows(w_down_t_ptr, rows, keep, D, BLOCK_W)
    rows += P * BLOCK_N
    keep = tl.load(keep_ptr + rows, mask=rows < F, other=0) != 0
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for block in range(pid, tl.cdiv(F, BLOCK_N), P):  # rows: block + P's, read while block's are folded
        gate_next = word_rows(w_gate_ptr, rows, rows < F, D, BLOCK_W)
        up_next = word_rows(w_up_ptr, rows, keep, D, BLOCK_W)
        down_next = word_rows(w_down_t_ptr, rows, keep, D, BLOCK_W)
        rows += P * BLOCK_N
        keep = tl.load(keep_ptr + rows, mask=rows < F, other=0) != 0
        acc |= gate | up | down
        gate, up, down = gate_next, up_next, down_next
    ws = tl.arange(0, BLOCK_W)
    out = out_ptr + pid * BLOCK_N * (D // 2) + tl.arange(0, BLOCK_N)[:, None] * (D // 2) + ws[None, :]
    tl.store(out, acc, mask=(ws < D // 2)[None, :])


def read_rows(keep: torch.Tensor, w_gate, w_up, w_down_t, out=None) -> torch.Tensor:
    """read_rows_kernel on mlp_kernel's grid (CATS mode): [programs, BLOCK_N, d / 2] int32."""
    F_, D = w_gate.shape
    if D % 2 or not all(w.is_contiguous() for w in (w_gate, w_up, w_down_t)):
        raise ValueError(f"read_rows reads rows as int32 words: contiguous weights of even d, got d = {D}")
    c = kernel.mlp_config(D, F_, True)
    programs = kernel.persistent_programs(c, F_)
    out = torch.empty((programs, c["BLOCK_N"], D // 2), device=keep.device, dtype=torch.int32) if out is None else out
    read_rows_kernel[(programs,)](keep, w_gate, w_up, w_down_t, out, D, F_, BLOCK_N=c["BLOCK_N"],
                                  BLOCK_W=triton.next_power_of_2(D // 2), num_warps=c["num_warps"])
    return out


def read_rows_reference(keep, w_gate, w_up, w_down_t, programs, block_n) -> torch.Tensor:
    """What read_rows returns, in plain PyTorch: round r gives program p its block r * programs + p."""
    F_, D = w_gate.shape
    blocks = triton.cdiv(F_, block_n)
    pad = lambda t: torch.cat([t, t.new_zeros((blocks * block_n - F_,) + t.shape[1:])])  # noqa: E731
    gate, up, down = (pad(w.view(torch.int32)).view(blocks, block_n, D // 2) for w in (w_gate, w_up, w_down_t))
    kept = pad(keep.bool()).view(blocks, block_n, 1)
    fold = gate | torch.where(kept, up | down, 0)
    out = torch.zeros((programs, block_n, D // 2), dtype=torch.int32, device=keep.device)
    for first in range(0, blocks, programs):
        n = min(programs, blocks - first)
        out[:n] |= fold[first: first + n]
    return out


def bench_floor(args):
    """The one-token CATS MLP against only reading its bytes: read_rows_kernel with the keep mask the
    threshold gives, in mlp_kernel's programs and blocks. What mlp_kernel takes beyond it is its own
    arithmetic and its waits; cats_mlp adds reduce_kernel (the partial rows summed) and a launch."""
    bw = ceilings()
    print(f"{'shape':<11} {'target':>6} {'kept':>6} {'cats_mlp us':>11} {'mlp_kernel us':>13} {'read only us':>12} "
          f"{'bytes at ceiling us':>19} {'read % of ceiling':>17}")
    print("(target: the threshold's sparsity; kept: fraction of neurons whose W_up/w_down_t rows are read; cats_mlp "
          "= mlp_kernel + reduce_kernel; read only: read_rows_kernel, the same bytes with the mask given)")
    for name in args.shapes:
        d, ffn = SHAPES[name][:2]
        ws = [random_mlp(d, ffn) for _ in range(N_COPIES)]
        x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        g = gate_magnitudes(x, ws[0][0])[0]
        for s in args.sparsity:
            t = threshold_for(x, ws[0][0], s)
            keep = (g > t).to(torch.int8)
            kept = keep.float().mean().item()
            mlp_us = bench_us(rotating(lambda a, b, c: cats_mlp(x, a, b, c, t), ws)) / len(ws)
            kernel_us = bench_us(rotating(lambda a, b, c: kernel.mlp(x, a, b, c, t), ws)) / len(ws)
            read_us = bench_us(rotating(lambda a, b, c: read_rows(keep, a, b, c), ws)) / len(ws)
            floor_us = d * ffn * 2 * (1 + 2 * kept) / bw * 1e6
            print(f"{name:<11} {s:>6.2f} {kept:>6.3f} {mlp_us:>11.1f} {kernel_us:>13.1f} {read_us:>12.1f} "
                  f"{floor_us:>19.1f} {100 * floor_us / read_us:>16.1f}%", flush=True)
        del ws
        torch.cuda.empty_cache()


def bench_check(args):
    """cats_mlp and linear on the GPU against fp64, fresh random inputs, 0% / ~50% / 100% active."""
    torch.manual_seed(0)
    worst = {}
    for d, ffn in [(576, 1536), (1000, 2750), (4096, 11008), (4096, 14336), (5120, 13824), (37, 53)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = random_mlp(d, ffn, dtype)
            for B in range(1, 9):
                x = torch.randn(B, d, device="cuda", dtype=dtype)
                g = F.silu(x.double() @ w[0].double().T).abs().flatten().sort().values
                gaps = g[1:] - g[:-1]
                mid = g.numel() // 2 + int(torch.argmax(gaps[g.numel() // 2: g.numel() // 2 + 64]))
                for t in (float("inf"), float((g[mid] + g[mid + 1]) / 2), -1.0):
                    ref = cats_mlp_reference(*(a.double() for a in (x, *w)), t)
                    out = cats_mlp(x, *w, t)
                    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    if not torch.isfinite(out).all():
                        err = float("inf")
                    key = ("cats_mlp", dtype)
                    worst[key] = max(worst.get(key, 0.0), err if t != float("inf") else out.abs().max().item())
                y = linear(x, w[0])
                ref = linear_reference(x.double(), w[0].double())
                err = ((y.double() - ref).norm() / ref.norm()).item()
                worst[("linear", dtype)] = max(worst.get(("linear", dtype), 0.0), err if torch.isfinite(y).all() else float("inf"))
    for (op, dtype), e in worst.items():
        print(f"check {op} {dtype}: worst relative error vs fp64 {e:.2e}")


def random_model(name: str) -> Transformer:
    d, ffn, n_layer, n_head, n_kv, vocab = SHAPES[name]
    args = ModelArgs(dim=d, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, head_dim=d // n_head,
                     intermediate_size=ffn, vocab_size=vocab)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    model.inv_freq = model.inv_freq.float()
    for layer in model.layers:
        torch.nn.init.normal_(layer.feed_forward.w_down_t, std=ffn ** -0.5)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_in_place(model: Transformer, sparsity: float, tokens: torch.Tensor):
    """Per-layer thresholds from this model's own activations, layer by layer with CATS already on in
    earlier layers, so the target holds once every layer is sparse."""
    def set_threshold(ff, inputs):
        g = F.silu(ff.w_gate(inputs[0])).abs().float().flatten()
        ff.threshold = torch.quantile(g[: 2 ** 24], sparsity).reshape(())
    hooks = [l.feed_forward.register_forward_pre_hook(set_threshold) for l in model.layers]
    model.set_kernel("torch")
    model(tokens)
    for h in hooks:
        h.remove()
    return torch.stack([l.feed_forward.threshold for l in model.layers])


@torch.no_grad()
def decode_sparsity(model: Transformer, prompt: torch.Tensor, n: int) -> float:
    """Mean fraction of zeroed gate activations over n greedy decode steps (plain-torch path), counted
    teacher-forced over the tokens those steps took in, as generate.py counts it."""
    from generate import generate, mlp_sparsity
    tokens, _ = generate(model, prompt, n)
    return mlp_sparsity(model, tokens[:, :-1], start=prompt.shape[1]).mean().item()


def model_and_tokens(args, name: str):
    """The model to time (the --ckpt checkpoint, or random weights of shape `name`), with the seeded
    prompt and calibration tokens that every mode of `decode` and `profile` uses."""
    model = Transformer.from_pretrained(args.ckpt, "cuda", torch.bfloat16) if args.ckpt else random_model(name)
    torch.manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, args.prompt_len), device="cuda")
    calib = torch.randint(0, model.args.vocab_size, (1, 256), device="cuda")
    return model, prompt, calib


def compiled_step(model: Transformer, kernel_choice: str, sparsity: float, prompt: torch.Tensor,
                  calib: torch.Tensor, cache: int):
    """Set the model up for one mode and return (its decode step compiled into a CUDA graph and warmed
    up, the fraction of gate activations CATS zeroes). The model is left with that mode's thresholds
    (calibrated on its own activations over `calib`), kernel choice and a fresh KV cache of `cache` slots."""
    from generate import decode_one_token, generate
    zeros = 0.0
    model.set_thresholds(None)
    if sparsity > 0:
        model.set_thresholds(calibrate_in_place(model, sparsity, calib), kernel="torch")
        zeros = decode_sparsity(model, prompt, 32)
    model.set_kernel(kernel_choice)
    torch._dynamo.reset()  # a fresh graph for each mode
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    model.setup_caches(1, cache)
    for _ in range(2):  # compile, capture, warm up
        generate(model, prompt, 16, decode_step=step)
    return step, zeros


def bench_decode(args):
    """Decode speed of a whole random-weight model: plain PyTorch (cuBLAS) compiled, ours dense, and ours
    with CATS; every mode torch.compile(mode="reduce-overhead") (CUDA graphs), timed in the same run."""
    from generate import generate, weight_bytes_per_token
    bw = ceilings() / 1e9
    print(f"prompt {args.prompt_len}, {args.new_tokens} new tokens, KV cache {args.cache} (plain torch's SDPA reads all "
          f"of it; our attention kernel only the filled positions) | programmatic dependent launch: {kernel.USE_PDL}")
    print(f"{'shape':<11} {'mode':<20} {'sparsity':>8} {'tok/s':>7} {'x plain':>7} {'x dense':>7} {'GB/tok':>7} "
          f"{'GB/s':>6} {'limit tok/s':>11} {'% limit':>7}")
    for name in [args.ckpt.name] if args.ckpt else args.shapes:
        model, prompt, calib = model_and_tokens(args, name)
        a = model.args
        kv = 2 * a.n_layer * a.n_kv_head * a.head_dim * 2 * args.cache / 1e9
        speed = {}
        for mode, s in [("plain torch (cuBLAS)", 0.0), ("dense", 0.0)] + [("cats", s) for s in args.sparsity]:
            step, zeros = compiled_step(model, "torch" if mode.startswith("plain") else "auto", s, prompt, calib, args.cache)
            _, t = generate(model, prompt, args.new_tokens, decode_step=step)
            tps = t["decode_tokens"] / t["decode_s"]
            speed[mode] = tps
            gb = weight_bytes_per_token(model, zeros) / 1e9
            label = mode if s == 0 else f"cats {s:g} triton"
            print(f"{name:<11} {label:<20} {zeros:>8.3f} {tps:>7.1f} {tps / speed['plain torch (cuBLAS)']:>7.3f} "
                  f"{tps / speed.get('dense', tps):>7.3f} {gb:>7.2f} {gb * tps:>6.0f} {bw / gb:>11.1f} "
                  f"{100 * tps * gb / bw:>6.1f}%  (+{kv:.2f} GB KV cache)", flush=True)
        del model
        torch.cuda.empty_cache()


WEIGHT_KERNELS = ("gemv_kernel", "mlp_kernel")  # kernel.py's, at batch 1


@torch.no_grad()
def bench_profile(args):
    """Kernel by kernel, where one compiled decode step spends its time (torch.profiler over CUDA-graph
    replays at the middle position of a `decode` run): our dense step and CATS at each --sparsity. The
    step time is under the profiler, so a little longer than `decode` measures."""
    from generate import weight_bytes_per_token
    if kernel.USE_PDL:
        raise SystemExit("error: run the profile as `CATS_PDL=0 python bench.py profile ...`: with programmatic "
                         "dependent launch each kernel's time includes its wait for the one before, so the times overlap")
    pos, n = args.prompt_len + args.new_tokens // 2, 20
    if pos >= args.cache:
        raise SystemExit(f"error: the profiled position {pos} (prompt + half the new tokens) must be inside the "
                         f"KV cache ({args.cache}); raise --cache")
    bw = ceilings() / 1e9
    for name in [args.ckpt.name] if args.ckpt else args.shapes:
        model, prompt, calib = model_and_tokens(args, name)
        for s in [0.0] + [s for s in args.sparsity if s > 0]:
            step, zeros = compiled_step(model, "auto", s, prompt, calib, args.cache)
            cur, input_pos = prompt[:, -1:].clone(), torch.tensor([pos], device="cuda")
            for _ in range(5):
                step(model, cur, input_pos, 0.0, None)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    step(model, cur, input_pos, 0.0, None)
                end.record()
                torch.cuda.synchronize()
            wall = start.elapsed_time(end) * 1e3 / n
            per_kernel = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    k = e.name.split("(")[0][:40]
                    us, count = per_kernel.get(k, (0.0, 0))
                    per_kernel[k] = (us + e.device_time_total, count + 1)
            busy = sum(us for us, _ in per_kernel.values()) / n
            weights = sum(us for k, (us, _) in per_kernel.items() if k.startswith(WEIGHT_KERNELS)) / n
            rate = weight_bytes_per_token(model, zeros) / (weights * 1e-6) / 1e9  # GB/s
            print(f"\n{name} {'dense' if s == 0 else f'cats {s:g}'} (measured sparsity {zeros:.3f}), position {pos}: "
                  f"step {wall:.0f} us (profiled), kernels busy {busy:.0f} us, between kernels {wall - busy:.0f} us; "
                  f"weight-reading kernels {weights:.0f} us = {rate:.0f} GB/s ({100 * rate / bw:.0f}% of the {bw:.0f} GB/s read rate)")
            print(f"  {'kernel':<40} {'us/step':>8} {'launches':>8} {'us each':>8}")
            for k, (us, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]:
                print(f"  {k:<40} {us / n:8.1f} {count / n:8.0f} {us / count:8.2f}")
        del model
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["mlp", "linear", "chain", "floor", "decode", "profile", "sweep", "check"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--cache", type=int, default=1024, help="KV cache length (decode)")
    p.add_argument("--ckpt", type=Path, help="decode, profile: a real checkpoint folder instead of the random-weight --shapes")
    p.add_argument("--config-out", help="sweep: write the best launch configurations here (JSON)")
    p.add_argument("--config", help="use launch configurations from a sweep's JSON instead of kernel.py's")
    args = p.parse_args(argv)
    # Bad input fails here, in one line, before the GPU check and long before a sweep ends.
    for s in args.sparsity:
        if not 0 <= s < 1:
            raise SystemExit(f"error: --sparsity must be in [0, 1), got {s:g}")
    if args.config_out:
        try:
            check_writable(Path(args.config_out), "--config-out")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.config:
        use_configs(args.config)
    try:
        if args.ckpt:
            read_args(args.ckpt)  # the weights are checked as they load
        if not torch.cuda.is_available():
            raise SystemExit("error: bench.py needs a CUDA GPU")
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16")
        {"mlp": bench_mlp, "linear": bench_linear, "chain": bench_chain, "floor": bench_floor, "decode": bench_decode, "profile": bench_profile,
         "sweep": bench_sweep, "check": bench_check}[args.mode](args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
