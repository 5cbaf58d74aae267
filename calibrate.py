"""Calibrate CATS thresholds on text, and measure what they do to perplexity.

    python calibrate.py --ckpt DIR --data book.txt --sparsity 0.3 0.5 0.7 0.9
    python calibrate.py --ckpt DIR --eval wiki.test.txt --sparsity 0 0.5 0.7   # with the thresholds made above

Calibration runs the model over --tokens tokens of the --data text, cut into non-overlapping --seq-len
windows (each starting with BOS when the tokenizer starts texts with one), and keeps a histogram of
|SiLU(W_gate x)| per layer (cats.py). Layer i's threshold t_i for sparsity s has a fraction s of the
activations counted at or below it, within half the mass of one histogram bin (bins are 2^-15 of their
value wide); that realised fraction and the bound are printed and stored in the file. Which activations
are counted is the --mode:

  sequential (default)  layer i sees the model whose layers 0..i-1 already run CATS at s, as it will in
                        use, so with CATS on in every layer the realised fraction on the calibration tokens
                        is the stored one, on target in every layer. One level at a time, layer by layer:
                        about 1.2 dense forwards per level (W_gate runs twice); memory is the model, one
                        histogram and the hidden states of all windows ([windows, seq_len, dim]).
  dense                 every layer sees the dense model, as in the paper: one forward gives every level
                        (memory: the model plus 8 MiB per layer), but with CATS on in every layer the
                        deeper layers see shifted activations and fall short of the target.

--eval prints perplexity and realised sparsity (the fraction of gate activations CATS zeroes, with CATS
on in every layer) for dense and each sparsity.
"""
import argparse
import gzip
import hashlib
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cats import (N_BINS, ThresholdError, abs_histogram, available_sparsities, cats_activation,
                  default_threshold_path, load_thresholds, model_signature, save_thresholds, thresholds_from_histogram)
from model import (CheckpointError, Transformer, attention_mask, check_device, check_writable, load_tokenizer,
                   rope_cos_sin)

DEFAULT_SPARSITIES = [0.3, 0.5, 0.7, 0.9]


# ---------------------------------------------------------------------------------------------------
# Text -> token windows

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: Path, n_chars: int = -1) -> str:
    """Up to n_chars characters (-1: all) of a UTF-8 text file, gzip-compressed when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read(n_chars)


def token_windows(tokenizer, files: list[Path], n_tokens, seq_len: int) -> Tensor:
    """[n_windows, seq_len] token ids: the files' texts (plain or .gz), tokenized one after another, cut
    into full windows (no padding) of at most n_tokens tokens in all (None: as many as the text fills)."""
    prefix = tokenizer.encode("", bos=True)  # [BOS], or [] where the tokenizer starts texts with nothing
    body = seq_len - len(prefix)
    want = None if n_tokens is None else n_tokens // seq_len * body  # text tokens needed
    ids = []
    for path in files:
        # Read no more text than the windows need (16 characters a token is generous for any language).
        budget = -1 if want is None else 16 * (want - len(ids)) + 1
        ids += tokenizer.encode(read_text(path, budget), bos=False)
        if want is not None and len(ids) >= want:
            break
    n = len(ids) // body if want is None else min(want, len(ids)) // body
    if n == 0:
        raise ValueError(f"{', '.join(map(str, files))}: {len(ids)} tokens, less than one {seq_len}-token "
                         f"window; give more text or a smaller --seq-len")
    text = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.tensor(prefix, dtype=text.dtype).expand(n, -1), text], dim=1)


# ---------------------------------------------------------------------------------------------------
# Running the model over windows

@contextmanager
def gate_hooks(model: Transformer, fn):
    """Call fn(i, v) with v = SiLU(W_gate x) of layer i on every forward. SiLU is recomputed from the
    W_gate output, the same op on the same values as FeedForward, so v is exactly what CATS sees."""
    handles = [layer.feed_forward.w_gate.register_forward_hook(lambda m, inp, out, i=i: fn(i, F.silu(out)))
               for i, layer in enumerate(model.layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def progress(label: str, total: int, unit: str, work: float):
    """step(done) prints "label: done/total unit, rate, time left" on stderr: on a terminal at most once a
    second, rewriting one line; in a log file a line every 10 s. The last step always prints. `work`: what one
    step costs in tokens through the whole model (one layer of n is 1/n of a token), for the rate."""
    t0, last, tty = time.perf_counter(), [0.0], sys.stderr.isatty()

    def step(done: int):
        now = time.perf_counter()
        if now - last[0] > (1 if tty else 10) or done == total:
            last[0] = now
            rate = done * work / (now - t0)
            line = f"{label}: {done}/{total} {unit}, {rate:,.0f} tok/s, {(total - done) * work / rate:.0f} s left"
            print(f"\r{line}" if tty else line, end="" if tty and done < total else "\n", file=sys.stderr, flush=True)
    return step


def run_windows(model: Transformer, windows: Tensor, label: str, fn=None):
    """model(window) for each window in turn, with progress on stderr; fn(logits, window) sees each."""
    device = model.inv_freq.device
    n, seq_len = windows.shape
    step = progress(label, n, "windows", seq_len)
    for w in range(n):
        idx = windows[w : w + 1].to(device)
        logits = model(idx)
        if fn is not None:
            fn(logits, idx)
        step(w + 1)


@torch.no_grad()
def gate_histograms(model: Transformer, windows: Tensor) -> Tensor:
    """Dense model over the windows -> [n_layer, N_BINS] histograms of |SiLU(W_gate x)| per layer."""
    model.set_thresholds(None)
    hist = torch.zeros(model.args.n_layer, N_BINS, dtype=torch.int64, device=model.inv_freq.device)

    def count(i, v):
        hist[i] += abs_histogram(v)

    def check(out, idx):  # an inf or NaN anywhere in the layers reaches the final hidden state
        if not torch.isfinite(out).all():
            raise ValueError(f"the model overflows to inf/NaN in {out.dtype} on this text; use --dtype float32")

    head, model.output = model.output, torch.nn.Identity()  # calibration needs no logits: skip the LM head
    try:
        with gate_hooks(model, count):
            run_windows(model, windows, "calibrating", check)
    finally:
        model.output = head
    return hist.cpu()


@torch.no_grad()
def sequential_thresholds(model: Transformer, windows: Tensor, sparsity: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thresholds for one sparsity, layer by layer: layer i's threshold comes from the activations it sees
    when layers 0..i-1 already run CATS at the same sparsity, which is how it will be used. Returns
    (t, realised, bound), each [n_layer], as thresholds_from_histogram; realised is then exactly the
    fraction CATS zeroes on these windows with CATS on in every layer.

    The hidden states of every window are kept for the current layer only ([n_windows, seq_len, dim] in
    the model dtype, overwritten as each layer finishes), with one histogram. Per layer, two passes over
    the windows: attention, then |SiLU(W_gate x)| into the histogram; after the threshold is picked, the
    CATS MLP, which computes W_gate x again (keeping it would take ffn/dim times more memory)."""
    device = model.inv_freq.device
    n, seq_len = windows.shape
    n_layer = model.args.n_layer
    x = model.tok_embeddings(windows.to(device))
    # The same positions, rope and mask as Transformer.forward without a KV cache, so the maths is the model's.
    pos = torch.arange(seq_len, device=device)
    cos, sin = rope_cos_sin(model.inv_freq, pos, x.dtype)
    window = model.args.sliding_window
    mask = attention_mask(pos, pos, window) if window is not None and seq_len > window else None
    step = progress(f"calibrating {sparsity:g} sequentially", n_layer, "layers", n * seq_len / n_layer)
    results = []
    model.set_thresholds(None)
    try:
        for i, layer in enumerate(model.layers):
            ff = layer.feed_forward
            hist = torch.zeros(N_BINS, dtype=torch.int64, device=device)
            for w in range(n):  # one window at a time, as model(window) runs: the same values bit for bit
                h = x[w : w + 1]
                h.copy_(h + layer.attention(layer.attention_norm(h), cos, sin, mask, None))
                hist += abs_histogram(F.silu(ff.w_gate(layer.ffn_norm(h))))
            t, realised, bound = thresholds_from_histogram(hist, sparsity)
            # CATS on in this layer, for the layers after it. ff itself runs, so the path (and its rounding)
            # is the one model(window) takes: for windows of 2 or more tokens always plain PyTorch.
            ff.threshold = t.to(device, torch.float32)
            for w in range(n):
                h = x[w : w + 1]
                h.copy_(h + ff(layer.ffn_norm(h)))
            if not torch.isfinite(x).all():
                raise ValueError(f"the model overflows to inf/NaN in {x.dtype} at layer {i} on this text; "
                                 f"use --dtype float32")
            results.append((t, realised, bound))
            step(i + 1)
    finally:
        model.set_thresholds(None)
    return tuple(torch.stack(v) for v in zip(*results))


@torch.no_grad()
def evaluate(model: Transformer, windows: Tensor, label: str = "evaluating") -> tuple[float, Tensor]:
    """Perplexity over the windows (every token after a window's first), and the fraction of gate
    activations that came out zero in each layer, with whatever thresholds the model has set."""
    n_layer = model.args.n_layer
    zeros = torch.zeros(n_layer, dtype=torch.float64, device=model.inv_freq.device)
    seen = torch.zeros(n_layer, dtype=torch.float64, device=model.inv_freq.device)
    nll = torch.zeros((), dtype=torch.float64, device=model.inv_freq.device)

    def count(i, v):
        t = model.layers[i].feed_forward.threshold
        a = v if t is None else cats_activation(v, t)
        zeros[i] += (a == 0).sum()
        seen[i] += a.numel()

    def add_loss(logits, idx):
        nll.add_(F.cross_entropy(logits[0, :-1].float(), idx[0, 1:], reduction="sum").double())

    with gate_hooks(model, count):
        run_windows(model, windows, label, add_loss)
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(nll.item() / n_pred), (zeros / seen).cpu()


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--data", nargs="+", type=Path, help="calibration text file(s), UTF-8")
    p.add_argument("--sparsity", nargs="+", type=float, default=None,
                   help=f"target sparsities in [0, 1); 0 = dense (default: calibrate {DEFAULT_SPARSITIES}; "
                        f"evaluate dense and every level in the file)")
    p.add_argument("--mode", choices=["sequential", "dense"], default="sequential",
                   help="sequential (default): each layer calibrated with the layers before it already running "
                        "CATS, so the sparsity holds with CATS on; dense: every layer from the dense model, "
                        "as in the paper (one pass for all levels, but deeper layers then fall short of target)")
    p.add_argument("--tokens", type=int, default=65536, help="calibration tokens (whole windows, BOS included)")
    p.add_argument("--seq-len", type=int, default=1024, help="window length, for calibration and --eval")
    p.add_argument("--out", "--thresholds", dest="out", type=Path, default=None,
                   help="threshold file that calibration writes and --eval reads "
                        "(default: CKPT/cats_thresholds.safetensors, where generate.py looks)")
    p.add_argument("--eval", type=Path, default=None, help="text file to measure perplexity and realised sparsity on")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="evaluate on at most this many tokens (default: the whole file)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    args.out = args.out or default_threshold_path(args.ckpt)
    return args


def check_args(args):
    """Bad input fails here, before anything slow happens, with one line saying what to do."""
    if args.data is None and args.eval is None:
        raise ValueError("nothing to do: pass --data FILE to calibrate, --eval FILE to evaluate, or both")
    for s in args.sparsity or []:
        if not 0 <= s < 1:
            raise ValueError(f"--sparsity must be in [0, 1), got {s:g}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.data is not None and args.tokens < args.seq_len:
        raise ValueError(f"--tokens ({args.tokens}) must be at least --seq-len ({args.seq_len})")
    if args.eval_tokens is not None and args.eval_tokens < args.seq_len:
        raise ValueError(f"--eval-tokens ({args.eval_tokens}) must be at least --seq-len ({args.seq_len})")
    for f in (args.data or []) + ([args.eval] if args.eval else []):
        if not f.is_file():
            raise ValueError(f"text file {f} does not exist")
    if args.data is not None:  # find out now, not after an hour of calibration, that --out cannot be written
        check_writable(args.out, "--out")
    check_device(args.device)


def calibrate(model, tokenizer, args) -> None:
    windows = token_windows(tokenizer, args.data, args.tokens, args.seq_len)
    n_tokens = windows.numel()
    if n_tokens < args.tokens // args.seq_len * args.seq_len:
        print(f"note: the data holds only {windows.shape[0]} windows; calibrating on {n_tokens} tokens",
              file=sys.stderr)
    levels = sorted({s for s in (args.sparsity or DEFAULT_SPARSITIES) if s > 0})
    if not levels:
        print("note: only sparsity 0 (dense) asked for: it needs no thresholds", file=sys.stderr)
        return
    t0 = time.perf_counter()
    if args.mode == "dense":
        hist = gate_histograms(model, windows)
        results = {s: thresholds_from_histogram(hist, s) for s in levels}
    else:
        results = {s: sequential_thresholds(model, windows, s) for s in levels}
    seconds = time.perf_counter() - t0
    thresholds, realised, bound = {}, {}, {}
    for s, (t, r, b) in results.items():
        thresholds[s], realised[f"{s:g}"], bound[f"{s:g}"] = t, r.tolist(), b.max().item()
    meta = {**model_signature(model), "mode": args.mode, "tokens": n_tokens, "seq_len": args.seq_len,
            "data": [{"path": str(f), "sha256": sha256_file(f)} for f in args.data],
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "device": args.device,
            "realised": realised, "bound": bound}
    save_thresholds(args.out, thresholds, meta)
    print(f"wrote {args.out}: {model.args.n_layer} layers x {len(levels)} sparsities, from {n_tokens} tokens "
          f"({windows.shape[0]} x {args.seq_len}), {args.mode} mode, {seconds:.1f} s")
    print("realised: on the calibration tokens, " + ("with the model dense" if args.mode == "dense" else
                                                     "with CATS on in every layer"))
    print("| target | threshold mean (min-max) | realised on calibration, max error | bound |")
    print("|---|---|---|---|")
    for s in levels:
        t, r = thresholds[s], torch.tensor(realised[f"{s:g}"])
        print(f"| {s:g} | {t.mean():.4g} ({t.min():.4g}-{t.max():.4g}) | {(r - s).abs().max() * 100:.4f} pp "
              f"| {bound[f'{s:g}'] * 100:.4f} pp |")


def evaluate_levels(model, windows, args) -> None:
    if args.sparsity is None:
        levels = [0.0] + (available_sparsities(args.out) if args.out.is_file() else [])
    else:
        levels = sorted(set([0.0] + args.sparsity))  # dense is always the baseline
    signature = model_signature(model)
    thresholds = {s: load_thresholds(args.out, s, signature) for s in levels if s > 0}  # fail before the slow part
    rows = []
    for s in levels:
        model.set_thresholds(thresholds.get(s), kernel="torch")
        ppl, zeros = evaluate(model, windows, f"evaluating {'dense' if s == 0 else f'sparsity {s:g}'}")
        rows.append((s, ppl, zeros))
    model.set_thresholds(None)
    print(f"{args.eval}: {windows.numel()} tokens ({windows.shape[0]} x {args.seq_len}), "
          f"{'thresholds ' + str(args.out) if thresholds else 'dense only'}")
    print("| sparsity | ppl | vs dense | realised sparsity mean | min | max |")
    print("|---|---|---|---|---|---|")
    dense_ppl = rows[0][1]
    for s, ppl, z in rows:
        print(f"| {'dense' if s == 0 else f'{s:g}'} | {ppl:.3f} | {(ppl / dense_ppl - 1) * 100:+.2f}% "
              f"| {z.mean():.4f} | {z.min():.4f} | {z.max():.4f} |")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        cuda = torch.device(args.device).type == "cuda"
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
        t0 = time.perf_counter()
        model = Transformer.from_pretrained(args.ckpt, device=args.device, dtype=dtype)
        tokenizer = load_tokenizer(args.ckpt)
        if args.seq_len > model.args.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context "
                             f"({model.args.max_position_embeddings}); use a smaller one")
        print(f"loaded {args.ckpt} ({model.args.architecture}, {args.device}, {dtype}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        # --eval text too short for one window fails now, not after calibration has written --out
        eval_windows = token_windows(tokenizer, [args.eval], args.eval_tokens, args.seq_len) if args.eval else None
        if args.data is not None:
            calibrate(model, tokenizer, args)
        if args.eval is not None:
            evaluate_levels(model, eval_windows, args)
    except (CheckpointError, ThresholdError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: a threshold file is only ever written whole, once calibration has finished",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
