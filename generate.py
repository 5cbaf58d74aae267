"""Generate text from a Llama/Mistral checkpoint, dense or with CATS sparsity.

    python generate.py --ckpt DIR --prompt "The capital of France is"
    python generate.py --ckpt DIR --sparsity 0.5          # thresholds from calibrate.py's default file
    python generate.py --ckpt DIR --sparsity 0.5 --compile --device cuda

The one-token decode step never syncs with the host (sampling included), so --compile can capture it in
a CUDA graph; prefill runs eagerly. Temperature 0 is greedy.
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from model import CheckpointError, Transformer, check_device, load_tokenizer


def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """logits [B, V] -> next token ids [B, 1]."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        pivot = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = torch.where(logits < pivot, -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / Exp(1)) draws from p without torch.multinomial's host sync.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    return sample(model(idx, input_pos)[:, -1], temperature, top_k)


def decode_one_token(model: Transformer, cur: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    return sample(model(cur, input_pos)[:, -1], temperature, top_k)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, eos_id: Optional[int] = None, decode_step=decode_one_token,
             on_token=None) -> tuple[Tensor, dict]:
    """prompt [B, T] -> tokens [B, T + n] (n <= max_new_tokens: stops early at EOS when B == 1).
    decode_step is decode_one_token or a compiled copy of it. Returns timings for prefill and decode."""
    B, T = prompt.shape
    device = prompt.device
    cache = model.layers[0].attention.kv_cache
    if cache is None or cache.k.shape[0] != B or model.max_seq_length < T + max_new_tokens:
        model.setup_caches(B, T + max_new_tokens)
    out = [prompt]
    t0 = time.perf_counter()
    cur = prefill(model, prompt, torch.arange(T, device=device), temperature, top_k)
    sync(device)
    t1 = time.perf_counter()
    out.append(cur)
    input_pos = torch.tensor([T], device=device)
    for _ in range(max_new_tokens - 1):
        if on_token is not None:
            on_token(cur)  # syncs to print; the step itself does not
        if B == 1 and eos_id is not None and cur.item() == eos_id:
            break
        # clone: a CUDA-graph replay overwrites its output buffer on the next step
        cur = decode_step(model, cur, input_pos, temperature, top_k).clone()
        out.append(cur)
        input_pos += 1
    else:
        if on_token is not None:
            on_token(cur)
    sync(device)
    t2 = time.perf_counter()
    tokens = torch.cat(out, dim=1)
    return tokens, {"prefill_s": t1 - t0, "prefill_tokens": B * T,
                    "decode_s": t2 - t1, "decode_tokens": B * (tokens.shape[1] - T - 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sparsity", type=float, default=0.0, help="CATS target sparsity in [0, 1); 0 = dense")
    p.add_argument("--thresholds", type=Path, default=None, help="threshold file (default: the one calibrate.py writes)")
    p.add_argument("--kernel", choices=["triton", "torch"], default=None,
                   help="decode path: triton (kernel.py; the default on CUDA) or plain torch (cuBLAS, CATS by masking)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    return p.parse_args(argv)


def check_args(args):
    """Bad input fails here, before anything slow happens, with one line saying what to do."""
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:  # written this way round, NaN fails too
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 1, or 0 to sample from every token, got {args.top_k}")
    if args.thresholds is not None and args.sparsity == 0:
        raise ValueError("--thresholds is read only with --sparsity S (S > 0, a level in the file); "
                         "pass --sparsity too")
    check_device(args.device)
    if args.kernel == "triton" and torch.device(args.device).type != "cuda":
        raise ValueError("--kernel triton needs a CUDA GPU; use --kernel torch (or drop --kernel) on the CPU")


def set_sparsity(model: Transformer, args):
    if args.sparsity == 0:
        return
    from cats import default_threshold_path, load_thresholds, model_signature
    path = args.thresholds or default_threshold_path(args.ckpt)
    thresholds = load_thresholds(path, args.sparsity, model_signature(model))
    model.set_thresholds(thresholds)


@torch.no_grad()
def mlp_sparsity(model: Transformer, tokens: Tensor, start: int = 0) -> Tensor:
    """Fraction of gate activations CATS zeroes in each layer, over tokens[:, start:] ([1, T]; the
    earlier ones are context only) in one plain forward: teacher-forced over the generated text, the
    activations the decode steps saw (up to rounding)."""
    zeros = []
    def count(ff, inputs):
        g = F.silu(ff.w_gate(inputs[0][:, start:])).abs()
        zeros.append(0.0 if ff.threshold is None else (g <= ff.threshold).float().mean().item())
    hooks = [layer.feed_forward.register_forward_pre_hook(count) for layer in model.layers]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return torch.tensor(zeros)


def weight_bytes_per_token(model: Transformer, sparsity: float) -> float:
    """Bytes of weights one decode step reads at batch 1: every parameter once, but one row of the
    embedding, and no W_up / W_down rows of zeroed neurons."""
    a = model.args
    size = model.tok_embeddings.weight.element_size()
    total = sum(p.numel() for p in model.parameters()) * size
    emb = a.vocab_size * a.dim * size * (0 if a.tie_embeddings else 1)  # tied: read whole, as the LM head
    mlp_skipped = 2 * a.dim * a.intermediate_size * size * a.n_layer * sparsity
    return total - emb + a.dim * size - mlp_skipped


def read_bandwidth(device) -> float:
    """Bytes/s that one big read (a sum over 1 GiB) reaches: the ceiling for reading weights."""
    from triton.testing import do_bench_cudagraph
    a = torch.randn(1 << 29, dtype=torch.bfloat16, device=device)
    seconds = do_bench_cudagraph(lambda: a.sum(dtype=torch.float32), return_mode="median") * 1e-3
    return a.numel() * 2 / seconds


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        t0 = time.perf_counter()
        model = Transformer.from_pretrained(args.ckpt, device=args.device, dtype=dtype)
        tokenizer = load_tokenizer(args.ckpt)
        model.set_kernel(args.kernel or "auto")
        set_sparsity(model, args)
        prompt = tokenizer.encode(args.prompt, bos=True)
        if not prompt:  # nothing to condition on: this tokenizer starts texts with no BOS token
            raise ValueError("--prompt is empty; give some text to continue")
        context = model.args.max_position_embeddings
        if len(prompt) >= context:
            raise ValueError(f"the prompt is {len(prompt)} tokens but the model's context is {context}; shorten it")
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    new_tokens = min(args.max_new_tokens, context - len(prompt))
    print(f"loaded {args.ckpt} ({model.args.architecture}, {args.device}, {dtype}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)

    torch.manual_seed(args.seed)
    step = decode_one_token
    if args.compile:
        step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    idx = torch.tensor([prompt], device=args.device)
    model.setup_caches(1, len(prompt) + new_tokens)  # once: re-allocating would force a new CUDA graph
    if args.compile:  # compile and capture outside the timed run
        generate(model, idx, min(new_tokens, 8), args.temperature, args.top_k, decode_step=step)

    printed = [tokenizer.decode(prompt)]
    seen = list(prompt)

    def stream(tok: Tensor):
        # Decode the whole text each time: pieces like "▁" only print right in context.
        seen.append(tok.item())
        text = tokenizer.decode(seen)
        print(text[len(printed[0]):], end="", flush=True)
        printed[0] = text

    print(printed[0], end="", flush=True)
    torch.manual_seed(args.seed)
    tokens, t = generate(model, idx, new_tokens, args.temperature, args.top_k, tokenizer.eos_id, step, stream)
    print()
    print(f"prefill: {t['prefill_tokens']} tokens in {t['prefill_s'] * 1e3:.1f} ms "
          f"({t['prefill_tokens'] / t['prefill_s']:.1f} tok/s)", file=sys.stderr)
    if t["decode_tokens"]:
        tps = t["decode_tokens"] / t["decode_s"]
        zeros = mlp_sparsity(model, tokens[:, :-1])
        gb = weight_bytes_per_token(model, zeros.mean().item()) / 1e9
        line = (f"decode: {t['decode_tokens']} tokens in {t['decode_s'] * 1e3:.1f} ms ({tps:.1f} tok/s); MLP sparsity "
                f"{zeros.mean():.3f} (layers {zeros.min():.3f}-{zeros.max():.3f}); {gb:.3f} GB of weights per token, "
                f"{gb * tps:.0f} GB/s")
        if torch.device(args.device).type == "cuda":
            bw = read_bandwidth(args.device) / 1e9
            line += f", {100 * gb * tps / bw:.0f}% of the {bw:.0f} GB/s this GPU reads at (limit {bw / gb:.0f} tok/s)"
        print(line, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: end the streamed text's line, then one line saying so
        print(flush=True)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
