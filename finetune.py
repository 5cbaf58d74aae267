"""Fine-tune a Llama/Mistral checkpoint with CATS in the loop, to win back the quality sparsity costs.

    python finetune.py --ckpt DIR --sparsity 0.5 --data train.txt.gz --eval val.txt --out DIR-cats50
    python finetune.py --ckpt DIR --sparsity 0 ...            # control: the dense model, same recipe
    python finetune.py --ckpt DIR --activation relu ...       # ReLUfication: ReLU in place of SiLU, dense
    python generate.py --ckpt DIR-cats50 --sparsity 0.5       # the result, with the thresholds it trained with

The CATS paper's third claim: with the thresholds fixed, LoRA fine-tuning closes the gap to the base model
quickly, and faster than ReLUfication (Mirzadeh et al. 2023: SiLU replaced by ReLU, then fine-tuned). Their
recipe gives the defaults: LoRA rank 64, alpha 16 on q, v, gate, up, down; learning rate 1e-5; 1000 steps of
8 x 1024 tokens. Give every arm the same --steps and --batch-tokens and the curves compare token for token.

With --sparsity s the thresholds calibrated for the base model (calibrate.py) stay fixed and every training
forward runs CATS: a zeroed gate activation passes no gradient, a surviving one does. A LoRA adapter is a
weight parametrization, W + (alpha / rank) B A (torch.nn.utils.parametrize): the model's own forward runs
unchanged on the adapted weights, and merging is computing that sum once. --full trains every weight.

Weights stay in float32 (an Adam step at lr 1e-5 is below bf16's resolution); --dtype bfloat16, the default
on CUDA, runs forward and backward under autocast. Held-out perplexity and realised sparsity on each --eval
file, every --eval-every steps, go to the terminal and to a CSV (--log) with the train loss; a PNG of the
curves is written beside it when matplotlib is installed. compare() prints several runs' CSVs as tables.

--out writes a checkpoint folder, all or nothing (a temporary folder, renamed when complete): adapters merged,
config.json + model.safetensors (float32), the tokenizer files, and for CATS the thresholds it trained with,
re-signed for the new weights so that generate.py and calibrate.py accept them. A ReLU run's config.json says
hidden_act "relu": transformers loads it; model.py refuses it, as CATS thresholds a SiLU.
"""
import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from calibrate import token_windows
from cats import (DEFAULT_FILENAME, ThresholdError, cats_activation, default_threshold_path, load_thresholds,
                  model_signature, read_threshold_file, save_thresholds)
from model import CheckpointError, Transformer, check_device, check_writable, load_tokenizer, read_config, save_pretrained

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


# ---------------------------------------------------------------------------------------------------
# Text -> token windows

def batches(windows: Tensor, size: int, seed: int):
    """Endless batches of `size` windows: each pass over the data in a fresh random order."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=g)
        for i in range(0, len(order) - size + 1, size):
            yield windows[order[i : i + size]]


# ---------------------------------------------------------------------------------------------------
# LoRA as a weight parametrization, and the ReLU baseline

class LoRA(nn.Module):
    """W -> W + (alpha / rank) * B @ A on `n_out` output rows of W starting at row `start` (q and v are row
    ranges of the fused wqkv). transposed: W is stored [in, out], like the model's w_down_t."""

    def __init__(self, n_out: int, n_in: int, rank: int, alpha: float, start: int = 0, transposed: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, n_in))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # nn.Linear's initialisation, as LoRA's reference code
        self.b = nn.Parameter(torch.zeros(n_out, rank))  # B = 0: training starts from the base model exactly
        self.scale, self.start, self.transposed = alpha / rank, start, transposed

    def forward(self, w: Tensor) -> Tensor:
        delta = self.scale * (self.b @ self.a)  # [n_out, n_in]
        if self.transposed:
            return w + delta.T
        return w + F.pad(delta, (0, 0, self.start, w.shape[0] - self.start - delta.shape[0]))


def add_lora(model: Transformer, targets, rank: int, alpha: float) -> list[nn.Parameter]:
    """Put a LoRA adapter on each target projection of every layer; returns the adapters' parameters."""
    a = model.args
    q, kv, ffn = a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.intermediate_size
    params = []
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        # target: (module, tensor name, out features, in features, first row, stored transposed)
        sites = {"q": (att.wqkv, "weight", q, a.dim, 0, False), "k": (att.wqkv, "weight", kv, a.dim, q, False),
                 "v": (att.wqkv, "weight", kv, a.dim, q + kv, False), "o": (att.wo, "weight", a.dim, q, 0, False),
                 "gate": (ff.w_gate, "weight", ffn, a.dim, 0, False), "up": (ff.w_up, "weight", ffn, a.dim, 0, False),
                 "down": (ff, "w_down_t", a.dim, ffn, 0, True)}
        for t in targets:
            module, name, n_out, n_in, start, transposed = sites[t]
            lora = LoRA(n_out, n_in, rank, alpha, start, transposed).to(model.inv_freq.device)
            parametrize.register_parametrization(module, name, lora)
            params += [lora.a, lora.b]
    return params


def merge_lora(model: Transformer) -> None:
    """Replace every adapted weight by W + (alpha / rank) B A, computed once: a plain model again."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def use_relu(model: Transformer) -> None:
    """ReLUfication's first stage: ReLU in place of SiLU in every MLP (dense, no thresholds). Each
    FeedForward gets this forward instead of its own: the same formula with the one op changed."""
    for layer in model.layers:
        ff = layer.feed_forward
        ff.forward = lambda x, ff=ff: (F.relu(ff.w_gate(x)) * ff.w_up(x)) @ ff.w_down_t


# ---------------------------------------------------------------------------------------------------
# Training and evaluation

def next_token_loss(model: Transformer, idx: Tensor, bf16: bool, reduction: str = "mean") -> Tensor:
    with torch.autocast(idx.device.type, torch.bfloat16, enabled=bf16):
        logits = model(idx)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: Transformer, windows: Tensor, batch: int, bf16: bool, relu: bool) -> tuple[float, float]:
    """Perplexity over the windows (every token after a window's first, as calibrate.evaluate counts) and
    the fraction of gate activations that come out zero over all layers: CATS' zeros, or ReLU's."""
    device = model.inv_freq.device
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # zeros, activations seen

    def count(ff, z):
        v = F.relu(z) if relu else F.silu(z)
        v = v if ff.threshold is None else cats_activation(v, ff.threshold)
        counts[0] += (v == 0).sum()
        counts[1] += v.numel()

    hooks = [layer.feed_forward.w_gate.register_forward_hook(lambda m, i, z, ff=layer.feed_forward: count(ff, z))
             for layer in model.layers]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for chunk in windows.split(batch):
            nll += next_token_loss(model, chunk.to(device), bf16, reduction="sum").double()
    finally:
        for h in hooks:
            h.remove()
    return math.exp(nll.item() / (windows.shape[0] * (windows.shape[1] - 1))), (counts[0] / counts[1]).item()


def train_step(model: Transformer, opt, params: list, batch: Tensor, micro: int, bf16: bool, grad_clip: float) -> float:
    """One optimizer step on batch [B, T], `micro` windows per forward (gradient accumulation: the same
    update in less memory). Returns the batch's mean loss."""
    loss = 0.0
    for idx in batch.split(micro):
        part = next_token_loss(model, idx, bf16) * (len(idx) / len(batch))
        part.backward()
        loss += part.item()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train(model: Transformer, params: list, train_windows: Tensor, evals: dict, args, log_path: Path) -> None:
    """AdamW on `params` for args.steps steps of args.batch_tokens tokens, evaluating on every eval set at
    step 0, every args.eval_every steps and at the end; a line and a CSV row every args.log_every steps."""
    device, bf16 = model.inv_freq.device, args.dtype == "bfloat16"
    per_step = args.batch_tokens // args.seq_len
    micro = args.micro_batch or per_step
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    data = batches(train_windows, per_step, args.seed)
    columns = ["step", "tokens", "elapsed_s", "lr", "train_loss"]
    columns += [f"{k}_{name}" for name in evals for k in ("ppl", "sparsity")]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0, train_s, losses = time.perf_counter(), 0.0, []  # train_s, losses: since the last row
    with open(log_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for step in range(args.steps + 1):
            lr = args.lr * min(1.0, step / args.warmup) if args.warmup else args.lr
            if step > 0:  # step 0 is the model as loaded: the curve's starting point
                t = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = lr
                losses.append(train_step(model, opt, params, next(data).to(device), micro, bf16, args.grad_clip))
                train_s += time.perf_counter() - t
                if not math.isfinite(losses[-1]):
                    raise ValueError(f"the loss is {losses[-1]} at step {step}; try a lower --lr or --dtype float32")
            do_eval = step % args.eval_every == 0 or step == args.steps
            if not (do_eval or step % args.log_every == 0):
                continue
            row = {"step": step, "tokens": step * args.batch_tokens, "lr": f"{lr:.3g}",
                   "train_loss": f"{sum(losses) / len(losses):.5f}" if losses else ""}
            line = f"step {step}/{args.steps}"
            if losses:
                line += f" | loss {row['train_loss']} | {len(losses) * args.batch_tokens / train_s:,.0f} tok/s"
            losses, train_s = [], 0.0
            if do_eval:
                for name, windows in evals.items():
                    ppl, sparsity = evaluate(model, windows, micro, bf16, args.activation == "relu")
                    row[f"ppl_{name}"], row[f"sparsity_{name}"] = f"{ppl:.4f}", f"{sparsity:.4f}"
                    line += f" | {name} ppl {ppl:.3f} (sparsity {sparsity:.3f})"
            row["elapsed_s"] = f"{time.perf_counter() - t0:.1f}"
            writer.writerow(row)
            f.flush()  # an interrupted run keeps its curve so far
            print(f"{line} | {row['elapsed_s']} s", flush=True)


# ---------------------------------------------------------------------------------------------------
# Curves: CSV -> PNG and markdown tables

def read_curve(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_runs(csv_paths) -> tuple[dict, list[str]]:
    """{run name (the CSV's file name): its rows}, and the eval sets they report, in order."""
    runs = {Path(p).stem: read_curve(p) for p in csv_paths}
    columns = [c for rows in runs.values() for c in (rows[0] if rows else {})]
    return runs, list(dict.fromkeys(c.removeprefix("ppl_") for c in columns if c.startswith("ppl_")))


def plot(csv_paths, png) -> bool:
    """Train loss and each eval file's perplexity against tokens seen, one line per run (CSV file, named by
    its file name). False, and nothing written, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs, evals = read_runs(csv_paths)
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(5 * (1 + len(evals)), 4), squeeze=False)
    for ax, col, title in zip(axes[0], ["train_loss"] + [f"ppl_{e}" for e in evals], ["train loss"] + evals):
        for name, rows in runs.items():
            pts = [(int(r["tokens"]), float(r[col])) for r in rows if r.get(col)]
            if pts:
                ax.plot(*zip(*pts), marker="o" if col != "train_loss" else None, markersize=3, label=name)
        ax.set(title=title if col == "train_loss" else f"{title} perplexity", xlabel="training tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def compare(csv_paths, png=None) -> None:
    """Print, for each eval file, a markdown table of perplexity (realised sparsity) at every evaluation:
    rows are tokens seen, columns the runs (CSV file names). With png, also plot all runs into it."""
    runs, evals = read_runs(csv_paths)
    for e in evals:
        table = {name: {int(r["tokens"]): (float(r[f"ppl_{e}"]), float(r[f"sparsity_{e}"]))
                        for r in rows if r.get(f"ppl_{e}")} for name, rows in runs.items()}
        print(f"\n{e}: perplexity (realised sparsity)\n")
        print("| tokens | " + " | ".join(runs) + " |")
        print("|---|" + "---|" * len(runs))
        for tokens in sorted(set().union(*table.values())):
            cells = [f"{v[0]:.3f} ({v[1]:.3f})" if (v := table[n].get(tokens)) else "" for n in runs]
            print(f"| {tokens:,} | " + " | ".join(cells) + " |")
    if png is not None:
        print(f"\nwrote {png}" if plot(csv_paths, png) else "\nmatplotlib is not installed: no plot")


# ---------------------------------------------------------------------------------------------------
# The fine-tuned checkpoint

def write_checkpoint(model: Transformer, args, carried, files: list[Path]) -> None:
    """Write the (merged) model to args.out, all or nothing: everything goes into a temporary folder beside
    it, renamed to args.out once complete (a rename is atomic), so an interrupted run leaves no half
    checkpoint. carried: (thresholds, their file's metadata, base fingerprint) for CATS, else None.
    files: the run's CSV (and PNG), copied in as finetune.csv (finetune.png)."""
    out = args.out
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        config = read_config(args.ckpt)
        if args.activation == "relu":
            config["hidden_act"] = "relu"  # what the weights now need; transformers honours it
        save_pretrained(model, tmp, config)
        for name in TOKENIZER_FILES:
            if (args.ckpt / name).is_file():
                shutil.copy2(args.ckpt / name, tmp / name)
        if carried is not None:
            # The thresholds are frozen by design: the same numbers, signed with the new weights'
            # fingerprint (load_thresholds refuses a file made for other weights), the calibration's
            # metadata kept, and a note saying where they come from.
            thresholds, meta, base_fingerprint = carried
            note = {"from_ckpt": str(args.ckpt), "from_fingerprint": base_fingerprint,
                    "note": "calibrated on the base model, then held fixed while finetune.py trained these weights"}
            save_thresholds(tmp / DEFAULT_FILENAME, {args.sparsity: thresholds},
                            {**meta, **model_signature(model), "carried_over": note})
        for f in files:
            shutil.copy2(f, tmp / f"finetune{f.suffix}")
        (tmp / "finetune.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())  # every byte on disk before the name points at it
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="Hugging Face checkpoint folder to start from")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="training text file(s), UTF-8, plain or .gz")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="CATS target sparsity in [0, 1); 0 = dense (the control)")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="threshold file (default: CKPT/cats_thresholds.safetensors, where calibrate.py writes it)")
    p.add_argument("--activation", choices=["silu", "relu"], default="silu",
                   help="relu: the ReLUfication baseline, ReLU in place of SiLU, dense")
    p.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", type=lambda s: s.split(","), default=["q", "v", "gate", "up", "down"],
                   help=f"comma-separated, of {','.join(LORA_TARGETS)} (default: q,v,gate,up,down)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step, a multiple of --seq-len")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="windows per forward pass (default: the whole batch); fewer saves memory, same update")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup; constant after")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    p.add_argument("--eval", nargs="*", type=Path, default=[], help="held-out text file(s) to measure perplexity on")
    p.add_argument("--eval-tokens", type=int, default=None, help="at most this many tokens of each (default: all)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (also at step 0 and the end)")
    p.add_argument("--log-every", type=int, default=10, help="steps between train-loss lines and CSV rows")
    p.add_argument("--log", type=Path, default=None, help="CSV of the curve (default: runs/finetune-ARM.csv)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the fine-tuned checkpoint folder here (must not exist yet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (weights stay float32); default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    args.thresholds = args.thresholds or default_threshold_path(args.ckpt)
    # not torch.device(args.device): a name it refuses would raise here; check_args reports it in one line
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    arm = "relu" if args.activation == "relu" else f"cats{args.sparsity:g}" if args.sparsity > 0 else "dense"
    args.log = args.log or Path("runs") / f"finetune-{arm}{'-full' if args.full else ''}.csv"
    return args


def check_args(args):
    """Bad input fails here, before anything slow happens, with one line saying what to do."""
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity:g}")
    if args.activation == "relu" and args.sparsity > 0:
        raise ValueError("--activation relu is the dense ReLUfication baseline and takes no CATS thresholds; "
                         "drop --sparsity")
    for flag, value, least in [("--steps", args.steps, 1), ("--lora-rank", args.lora_rank, 1),
                               ("--seq-len", args.seq_len, 2), ("--eval-every", args.eval_every, 1),
                               ("--log-every", args.log_every, 1), ("--warmup", args.warmup, 0),
                               ("--micro-batch", args.micro_batch or 1, 1)]:
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if args.lr <= 0 or args.lora_alpha <= 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise ValueError("--lr and --lora-alpha must be > 0, --grad-clip and --weight-decay >= 0")
    if args.batch_tokens < args.seq_len or args.batch_tokens % args.seq_len:
        raise ValueError(f"--batch-tokens ({args.batch_tokens}) must be a multiple of --seq-len ({args.seq_len})")
    if args.eval_tokens is not None and args.eval_tokens < args.seq_len:
        raise ValueError(f"--eval-tokens ({args.eval_tokens}) must be at least --seq-len ({args.seq_len})")
    unknown = [t for t in args.lora_targets if t not in LORA_TARGETS]
    if unknown or not args.lora_targets:
        raise ValueError(f"--lora-targets: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {','.join(LORA_TARGETS)}")
    for f in args.data + args.eval:
        if not f.is_file():
            raise ValueError(f"text file {f} does not exist")
    names = [eval_name(f) for f in args.eval]
    if len(set(names)) < len(names):
        raise ValueError(f"--eval files need different names (before the first '.'): {', '.join(names)}")
    if args.sparsity > 0:
        read_threshold_file(args.thresholds)  # missing or not a threshold file: say so before loading the model
    if args.out is not None:
        if args.out.exists():
            raise ValueError(f"--out {args.out} already exists; a checkpoint is never overwritten: remove it or "
                             f"choose another folder")
    check_writable(args.log, "--log")  # found out now, not after training
    if args.out:
        check_writable(args.out, "--out")
    check_device(args.device)


def eval_name(path: Path) -> str:
    return path.name.split(".")[0]  # wikitext-2-raw-test.txt -> wikitext-2-raw-test: a CSV column suffix


def run(args) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = Transformer.from_pretrained(args.ckpt, device=args.device, dtype=torch.float32)
    tokenizer = load_tokenizer(args.ckpt)
    if args.seq_len > model.args.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context "
                         f"({model.args.max_position_embeddings}); use a smaller one")
    carried = None
    if args.sparsity > 0:
        signature = model_signature(model)
        thresholds = load_thresholds(args.thresholds, args.sparsity, signature)
        model.set_thresholds(thresholds, kernel="torch")
        carried = (thresholds, read_threshold_file(args.thresholds)[1], signature["fingerprint"])
    if args.activation == "relu":
        use_relu(model)
    n_model = sum(p.numel() for p in model.parameters())
    if args.full:
        params = list(model.parameters())
    else:
        model.requires_grad_(False)
        params = add_lora(model, args.lora_targets, args.lora_rank, args.lora_alpha)
    n_train = sum(p.numel() for p in params)
    what = ("all weights" if args.full else
            f"LoRA rank {args.lora_rank} alpha {args.lora_alpha:g} on {','.join(args.lora_targets)}")
    arm = "ReLU, dense" if args.activation == "relu" else f"CATS {args.sparsity:g}" if args.sparsity > 0 else "dense"
    print(f"loaded {args.ckpt} ({model.args.architecture}, {args.device}, compute {args.dtype}) in "
          f"{time.perf_counter() - t0:.1f} s; {arm}; training {what}: {n_train:,} parameters "
          f"({100 * n_train / n_model:.2f}% of the model's {n_model:,})", file=sys.stderr)

    per_step = args.batch_tokens // args.seq_len
    train_windows = token_windows(tokenizer, args.data, args.steps * args.batch_tokens, args.seq_len)
    if len(train_windows) < per_step:
        raise ValueError(f"the training data fills {len(train_windows)} windows of {args.seq_len} tokens, fewer than "
                         f"one batch ({per_step}); give more text or fewer --batch-tokens")
    passes = args.steps * per_step / (len(train_windows) // per_step * per_step)
    print(f"training data: {train_windows.numel():,} tokens ({len(train_windows)} x {args.seq_len})"
          + (f"; {args.steps} steps take {passes:.2f} passes over it" if passes > 1 else ""), file=sys.stderr)
    evals = {eval_name(f): token_windows(tokenizer, [f], args.eval_tokens, args.seq_len) for f in args.eval}

    train(model, params, train_windows, evals, args, args.log)
    png = args.log.with_suffix(".png")
    plotted = plot([args.log], png)
    print(f"wrote {args.log}" + (f" and {png}" if plotted else " (matplotlib is not installed: no plot)"),
          file=sys.stderr)
    if args.out is not None:
        merge_lora(model)
        write_checkpoint(model, args, carried, [args.log] + ([png] if plotted else []))
        print(f"wrote {args.out}" + (f"; try: python generate.py --ckpt {args.out} --sparsity {args.sparsity:g}"
                                     if args.sparsity > 0 else ""), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        run(args)
    except (CheckpointError, ThresholdError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no checkpoint written; the curve so far is in the CSV", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
