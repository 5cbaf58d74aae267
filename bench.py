"""Benchmarks on a CUDA GPU, with random weights of a named shape (no checkpoint needed).

    python bench.py mlp                  # MLP: cuBLAS dense vs cats_mlp, sparsity 0-0.9, batch 1-8
    python bench.py decode               # whole model: tok/s dense vs CATS 0.5 / 0.7, 256 tokens
    python bench.py sweep                # launch configurations of the two kernels (see kernel.py)
    python bench.py check                # cats_mlp vs an fp64 reference on the GPU, all dtypes

Timing: CUDA graphs (triton.testing.do_bench_cudagraph), median, after warm-up; every ratio in a
table is measured in the same run. Bandwidth limits use the device-to-device copy rate measured first.
"""
import argparse

import torch
import torch.nn.functional as F
import triton

from kernel import cats_mlp, cats_mlp_reference
from model import ModelArgs, Transformer

# (d, ffn, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
}


def bench_us(fn, rep=200) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write), our ceiling for memory-bound kernels."""
    a = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB, 16-byte vector copies
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / (bench_us(lambda: b.copy_(a)) * 1e-6)


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


def threshold_for(x, w_gate, sparsity) -> torch.Tensor:
    """The sparsity-quantile of the actual |SiLU(W_gate x)| (pooled over the batch's tokens)."""
    g = F.silu(x.float() @ w_gate.float().T).abs().flatten()
    if sparsity == 0:
        return torch.tensor(-1.0, device=x.device)  # below every |g|: nothing skipped
    return torch.quantile(g[torch.randperm(g.numel(), device=g.device)[:2 ** 24]], sparsity).float()


def rows_needed(x, w_gate, t) -> float:
    """Fraction of neurons whose W_up / W_down rows some token needs."""
    g = F.silu(x.float() @ w_gate.float().T).abs()
    return (g > t).any(0).float().mean().item()


def bench_mlp(args):
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s")
    print(f"{'shape':<11} {'B':>2} {'target':>6} {'skipped':>7} {'dense us':>9} {'dense_t us':>10} {'cats us':>8} "
          f"{'x dense':>7} {'limit x':>7} {'GB/s':>6} {'% limit':>7}")
    print("(skipped: fraction of neurons no token keeps, whose W_up/W_down rows are not read; limit x: 3 / (1 + 2 (1 - skipped)); % limit: x dense / limit x)")
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
                      f"{dense / us:>7.3f} {limit:>7.3f} {nbytes / us / 1e3:>6.0f} {100 * dense / us / limit:>6.1f}%")
    return rows


def bench_sweep(args):
    """Time the whole cats_mlp over launch configurations (gate_up first, then down with the best
    gate_up), weights rotated through copies, at 50% sparsity; writes the best to --config-out."""
    import json
    import kernel
    best = {}
    for name in args.shapes:
        d, ffn = SHAPES[name][:2]
        ws = [random_mlp(d, ffn) for _ in range(N_COPIES)]
        for B in args.batch:
            x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
            t = threshold_for(x, ws[0][0], 0.5)
            run = rotating(lambda g, u, dt: kernel.cats_mlp_triton(x, g, u, dt, t), ws)
            gate_cfgs = [dict(BLOCK_B=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st)
                         for bn in (16, 32, 64) for bk in (128, 256, 512) for nw in (4, 8) for st in (3, 4)]
            if B == 1:  # the register path (no tensor cores) only makes sense for one token
                gate_cfgs += [dict(BLOCK_B=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=2)
                              for bn in (16, 32) for bk in (256, 512) for nw in (4, 8)]
            down_cfgs = [dict(BLOCK_B=16, BLOCK_D=bd, BLOCK_J=bj, programs=pr, num_warps=nw, num_stages=3)
                         for bd in (128, 256, 512) for bj in (16, 32, 64) for pr in (1024, 2048) for nw in (4, 8)]
            default_down = kernel.down_config
            results = []
            for c in gate_cfgs:
                kernel.gate_up_config = lambda *_, c=c: c
                results.append((time_or_inf(run), c))
            results.sort(key=lambda r: r[0])
            g_best = results[0][1]
            print(f"{name} B={B} gate_up: best {results[0][0]:.1f} us {g_best}; next "
                  + "; ".join(f"{u:.1f} {c}" for u, c in results[1:4]), flush=True)
            kernel.gate_up_config = lambda *_: g_best
            results = []
            for c in down_cfgs:
                kernel.down_config = lambda B_, D_, F_, c=c: down_config_for(c, D_, F_)
                results.append((time_or_inf(run), c))
            results.sort(key=lambda r: r[0])
            print(f"{name} B={B} down: best {results[0][0]:.1f} us {results[0][1]}; next "
                  + "; ".join(f"{u:.1f} {c}" for u, c in results[1:4]), flush=True)
            best[f"{name} B={B}"] = {"gate_up": g_best, "down": results[0][1], "us": results[0][0]}
            kernel.down_config = default_down
    if args.config_out:
        with open(args.config_out, "w") as f:
            json.dump(best, f, indent=1)


def time_or_inf(run) -> float:
    try:
        return bench_us(run, rep=50) / N_COPIES
    except triton.runtime.errors.OutOfResources:  # too much shared memory for this block shape
        return float("inf")


def down_config_for(c, D, F):
    """A down-kernel config with its split count worked out for this shape (as kernel.down_config does)."""
    splits = max(1, min(triton.cdiv(F, c["BLOCK_J"]), c["programs"] // triton.cdiv(D, c["BLOCK_D"])))
    rows = triton.cdiv(triton.cdiv(F, splits), c["BLOCK_J"]) * c["BLOCK_J"]
    return dict(c, ROWS_PER_PROG=rows, SPLITS=triton.cdiv(F, rows))


def use_configs(path):
    """Make cats_mlp use configurations found by `bench.py sweep` (keyed by shape and batch)."""
    import json
    import kernel
    found = json.load(open(path))
    by_dims = {(SHAPES[k.split()[0]][0], SHAPES[k.split()[0]][1], int(k.split("B=")[1])): v for k, v in found.items()}
    def pick(B, D, F, which, default):
        v = by_dims.get((D, F, B)) or by_dims.get((D, F, 1 if B == 1 else 8))
        if v is None:
            return default(B, D, F)
        return down_config_for(v["down"], D, F) if which == "down" else v["gate_up"]
    g0, d0 = kernel.gate_up_config, kernel.down_config
    kernel.gate_up_config = lambda B, D, F: pick(B, D, F, "gate_up", g0)
    kernel.down_config = lambda B, D, F: pick(B, D, F, "down", d0)


def bench_check(args):
    """cats_mlp on the GPU against fp64, fresh random inputs, outputs poisoned, 0% / ~50% / 100% active."""
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
                    worst[dtype] = max(worst.get(dtype, 0.0), err if t != float("inf") else out.abs().max().item())
    for dtype, e in worst.items():
        print(f"check {dtype}: worst relative error vs fp64 {e:.2e}")


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
    for l in model.layers:
        l.feed_forward.kernel = "torch"
    model(tokens)
    for h in hooks:
        h.remove()
    return torch.stack([l.feed_forward.threshold for l in model.layers])


@torch.no_grad()
def decode_sparsity(model: Transformer, prompt: torch.Tensor, n: int) -> float:
    """Mean fraction of zeroed gate activations over n greedy decode steps (eager, plain-torch path)."""
    from generate import generate
    zeros = []
    def count(ff, inputs):
        g = F.silu(ff.w_gate(inputs[0])).abs()
        zeros.append((g <= ff.threshold).float().mean().item())
    hooks = [l.feed_forward.register_forward_pre_hook(count) for l in model.layers]
    generate(model, prompt, n)
    for h in hooks:
        h.remove()
    return sum(zeros[len(model.layers):]) / len(zeros[len(model.layers):])  # decode steps only


def bench_decode(args):
    from generate import decode_one_token, generate
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"cache {args.cache}")
    print(f"{'shape':<11} {'mode':<16} {'sparsity':>8} {'tok/s':>7} {'x dense':>7} {'GB/tok':>7} {'GB/s':>6} "
          f"{'limit tok/s':>11} {'% limit':>7}")
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    for name in args.shapes:
        model = random_model(name)
        a = model.args
        torch.manual_seed(0)
        prompt = torch.randint(0, a.vocab_size, (1, args.prompt_len), device="cuda")
        calib = torch.randint(0, a.vocab_size, (1, 256), device="cuda")
        mlp_bytes = 3 * a.dim * a.intermediate_size * 2 * a.n_layer
        weight_bytes = sum(p.numel() * 2 for p in model.parameters()) - a.vocab_size * a.dim * 2  # embedding: one row
        dense_tps = None
        for mode, s in [("dense", 0.0)] + [("cats-triton", s) for s in args.sparsity]:
            if mode == "dense":
                model.set_thresholds(None)
                zeros = 0.0
            else:
                thr = calibrate_in_place(model, s, calib)
                model.set_thresholds(thr, kernel="torch")
                zeros = decode_sparsity(model, prompt, 32)
                model.set_thresholds(thr, kernel="triton")
            model.setup_caches(1, args.cache)
            for _ in range(2):  # compile, capture, warm up
                generate(model, prompt, 16, decode_step=step)
            torch.cuda.synchronize()
            _, t = generate(model, prompt, args.new_tokens, decode_step=step)
            tps = t["decode_tokens"] / t["decode_s"]
            dense_tps = dense_tps or tps
            gb = (weight_bytes - mlp_bytes * 2 / 3 * zeros) / 1e9
            kv = 2 * a.n_layer * a.n_kv_head * a.head_dim * 2 * args.cache / 1e9  # the static cache is read whole
            print(f"{name:<11} {mode:<16} {zeros:>8.3f} {tps:>7.1f} {tps / dense_tps:>7.3f} {gb:>7.2f} "
                  f"{gb * tps:>6.0f} {bw / 1e9 / gb:>11.1f} {100 * tps * gb / (bw / 1e9):>6.1f}%  (+{kv:.2f} GB KV read)")
        del model
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["mlp", "decode", "sweep", "check"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--cache", type=int, default=1024, help="KV cache length (decode)")
    p.add_argument("--config-out", help="sweep: write the best launch configurations here (JSON)")
    p.add_argument("--config", help="use launch configurations from a sweep's JSON instead of kernel.py's")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.py needs a CUDA GPU")
    if args.config:
        use_configs(args.config)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16")
    {"mlp": bench_mlp, "decode": bench_decode, "sweep": bench_sweep, "check": bench_check}[args.mode](args)


if __name__ == "__main__":
    main()
