"""Llama / Mistral decoder, loaded straight from Hugging Face safetensors checkpoints.

One file, no `transformers`: a config dataclass, the modules in the order data flows through them,
a static KV cache for decoding, and `Transformer.from_pretrained`. The MLP can run CATS (see cats.py):
set per-layer thresholds with `model.set_thresholds(...)` and the gate activation is zeroed wherever
|SiLU(W_gate x)| <= t. W_down is stored neuron-major ([ffn, d], i.e. transposed) so that an active
neuron's down-projection weights are one contiguous row, which is what the decode kernel reads.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cats import cats_activation

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class CheckpointError(Exception):
    """A checkpoint folder we cannot use; the message says what is wrong and what to do."""


@dataclass
class ModelArgs:
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3" | "linear", ...} as in config.json
    sliding_window: Optional[int] = None  # Mistral: a token sees at most this many tokens back
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    architecture: str = "LlamaForCausalLM"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @classmethod
    def from_hf_config(cls, cfg: dict, path="config.json") -> "ModelArgs":
        """path: the file cfg came from, for the error messages."""
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                                  f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {cfg['hidden_act']!r}: CATS needs a SiLU-gated MLP")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError("unsupported: attention_bias / mlp_bias are set; Llama and Mistral have no biases")
        # transformers >= 5 writes rope settings under "rope_parameters"; older checkpoints at the top level.
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        if not isinstance(cfg.get(rope_key) or {}, dict):
            raise CheckpointError(f"{path}: {rope_key} is {cfg[rope_key]!r}, not an object of settings; fix "
                                  f"config.json or re-download it")
        rope = dict(cfg.get(rope_key) or {})
        rope_base = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise CheckpointError(f"unsupported rope scaling {rope_type!r}; supported: default, llama3, linear")
        needs = {"llama3": ("factor", "low_freq_factor", "high_freq_factor"), "linear": ("factor",)}
        for field in needs.get(rope_type, ()):
            v = rope.get(field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CheckpointError(f"{path}: {rope_key} of type {rope_type} needs {field}, a number > 0, "
                                      f"got {v!r}; fix config.json or re-download it")
        # Checked here, not where they are used: a string or a 0 would fail deep inside torch.
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        for field in required + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = cfg.get(field)
            if v is None and field in required:
                raise CheckpointError(f"{path} has no {field}; it is not a complete config.json, re-download it")
            if v is not None and (type(v) is not int or v < 1):  # type, not isinstance: True is an int too
                raise CheckpointError(f"{path}: {field} is {v!r}, not an integer >= 1; fix config.json or "
                                      f"re-download it")
        n_head = cfg["num_attention_heads"]
        n_kv_head = cfg.get("num_key_value_heads") or n_head
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
        if n_head % n_kv_head or head_dim % 2 or (cfg.get("head_dim") is None and cfg["hidden_size"] % n_head):
            raise CheckpointError(f"{path}: {n_head} attention heads, {n_kv_head} key/value heads and head size "
                                  f"{head_dim} do not fit: the heads must split evenly into key/value groups (and "
                                  f"hidden_size into heads, without head_dim), and RoPE needs an even head size; "
                                  f"fix config.json or re-download it")
        eos = cfg.get("eos_token_id")
        return cls(
            dim=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], n_head=n_head, n_kv_head=n_kv_head,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_base=rope_base,
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            sliding_window=cfg.get("sliding_window") if arch == "MistralForCausalLM" else None,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096), architecture=arch,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotation frequency of each pair of head dimensions, with Llama-3.1 / linear scaling applied."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: leave high frequencies alone, divide low ones by `factor`, interpolate in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", args.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    freqs = pos.float()[:, None] * inv_freq[None, :]  # fp32, like the reference, whatever the model dtype
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # HF checkpoints pair dimension i with i + head_dim/2 ("rotate half"), not adjacent dimensions.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: Optional[int]) -> Tensor:
    """[T, S] bool: query at q_pos may attend key at k_pos (causal, and within the sliding window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    return allowed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, scale in the model dtype: the order the reference implementation uses.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_head: int, n_kv_head: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # kernel.decode_attention's per-head arrival counters (it leaves them at zero): kept here, so
        # no decode step spends a launch zeroing new ones
        self.register_buffer("counts", torch.zeros(batch * n_head, dtype=torch.int32, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # index_copy_ rather than slicing with Python ints: input_pos stays on the device, so the
        # step needs no host sync and can be captured in a CUDA graph.
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def use_kernels(x: Tensor, kernel: str) -> bool:
    """Whether this step takes kernel.py's Triton decode kernels: x is one new token for each of at most
    8 sequences, and kernel is "auto" on CUDA, or "triton" on CUDA or under Triton's CPU interpreter
    (TRITON_INTERPRET=1, as in the tests); never with "torch". Prefill always runs plain PyTorch."""
    if kernel == "torch" or x.shape[1] != 1 or x.shape[0] > 8:
        return False
    return x.is_cuda or (kernel == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
        self.wqkv = nn.Linear(args.dim, q + 2 * kv, bias=False)  # q, k, v fused: one GEMV per layer at decode
        self.wo = nn.Linear(q, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], input_pos: Optional[Tensor]) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim], -1)
        q = q.view(B, T, a.n_head, a.head_dim).transpose(1, 2)
        k = k.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        v = v.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        # mask None means plain causal over exactly these T tokens (lets SDPA pick flash attention).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=a.n_kv_head != a.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, a.n_head * a.head_dim))

    def decode(self, x: Tensor, norm: RMSNorm, input_pos: Tensor, inv_freq: Tensor) -> Tensor:
        """x + forward(norm(x)) for one new token per sequence, in three kernels: the norm folded into
        the q/k/v product, attention (RoPE and the cache write included, reading only the positions
        this token sees), the residual add folded into the wo product."""
        from kernel import decode_attention, linear
        a, x2 = self.args, x.view(x.shape[0], -1)
        qkv = linear(x2, self.wqkv.weight, norm.weight, norm.eps)
        c = self.kv_cache
        y = decode_attention(qkv, c.k, c.v, input_pos, inv_freq, a.n_head, a.sliding_window, c.counts)
        return linear(y, self.wo.weight, residual=x2).view_as(x)


class FeedForward(nn.Module):
    """SwiGLU MLP, W_down(act(W_gate x) * W_up x), where act is SiLU, or CATS when a threshold is set."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w_up = nn.Linear(args.dim, args.intermediate_size, bias=False)
        # Neuron-major W_down ([ffn, d]): row j holds neuron j's output weights, contiguous for the kernel.
        self.w_down_t = nn.Parameter(torch.empty(args.intermediate_size, args.dim))
        # 0-d fp32 tensor: CATS on; None: dense (a buffer: it moves with the module)
        self.register_buffer("threshold", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = self.threshold
        gate = F.silu(self.w_gate(x))
        if t is not None:
            gate = cats_activation(gate, t)
        return (gate * self.w_up(x)) @ self.w_down_t

    def decode(self, x: Tensor, norm: RMSNorm) -> Tensor:
        """x + forward(norm(x)) for one new token per sequence, through kernel.cats_mlp (dense when no
        threshold is set), which reads only the W_up and W_down rows of the neurons CATS keeps."""
        from kernel import cats_mlp  # imported lazily: the model itself runs without Triton
        x2 = x.view(x.shape[0], -1)
        return cats_mlp(x2, self.w_gate.weight, self.w_up.weight, self.w_down_t, self.threshold, norm.weight, norm.eps,
                        residual=x2).view_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x: Tensor, input_pos: Tensor, inv_freq: Tensor) -> Tensor:
        """forward for one new token per sequence through kernel.py's kernels: each RMSNorm folded into
        the product after it, each residual add into the one before it."""
        return self.feed_forward.decode(self.attention.decode(x, self.attention_norm, input_pos, inv_freq), self.ffn_norm)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.max_seq_length = 0
        self.kernel = "auto"

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the static KV cache; afterwards call model(idx, input_pos) to decode."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, self.args.n_head, self.args.n_kv_head, max_seq_length,
                                               self.args.head_dim, w.dtype, w.device)
        self.max_seq_length = max_seq_length

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> Tensor:
        """idx [B, T] -> logits [B, T, vocab]. Without input_pos: a plain causal forward over idx.
        With input_pos ([T] positions of these tokens): read and extend the KV cache."""
        B, T = idx.shape
        if input_pos is not None and self.max_seq_length == 0:
            raise RuntimeError("call model.setup_caches(max_batch_size, max_seq_length) before decoding with input_pos")
        x = self.tok_embeddings(idx)
        if input_pos is not None and use_kernels(x, self.kernel):
            return self.decode(x, input_pos)
        if input_pos is None:
            pos = torch.arange(T, device=idx.device)
            window = self.args.sliding_window
            mask = attention_mask(pos, pos, window) if window is not None and T > window else None
        else:
            pos = input_pos
            mask = attention_mask(pos, torch.arange(self.max_seq_length, device=idx.device), self.args.sliding_window)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))

    def decode(self, x: Tensor, input_pos: Tensor) -> Tensor:
        """The decode step through kernel.py (see use_kernels): 5 kernels per layer, where the PyTorch
        path launches a dozen or more small ones, and attention reads only the filled cache positions."""
        from kernel import linear
        for layer in self.layers:
            x = layer.decode(x, input_pos, self.inv_freq)
        return linear(x.view(x.shape[0], -1), self.output.weight, self.norm.weight, self.norm.eps).view(x.shape[0], 1, -1)

    def set_thresholds(self, thresholds: Optional[Tensor], kernel: Optional[str] = None):
        """CATS on with one threshold per layer ([n_layer] tensor), or dense again with None; kernel, if
        given, as in set_kernel."""
        if thresholds is not None and thresholds.shape != (self.args.n_layer,):
            raise ValueError(f"need one threshold per layer ({self.args.n_layer}), got shape {tuple(thresholds.shape)}")
        if kernel is not None:
            self.set_kernel(kernel)
        for i, layer in enumerate(self.layers):
            # each its own tensor, not a view of `thresholds`: a compiled step's CUDA graph copied such
            # views in on every replay (27 copies a step, measured)
            layer.feed_forward.threshold = None if thresholds is None else thresholds[i].to(self.inv_freq.device, torch.float32).clone()

    def set_kernel(self, kernel: str):
        """The decode path: "auto" (default: kernel.py's Triton kernels on CUDA, PyTorch elsewhere),
        "triton" (also on CPU under TRITON_INTERPRET=1), or "torch" (plain PyTorch: cuBLAS, and CATS by
        masking, which reads every weight)."""
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel must be 'auto', 'triton' or 'torch', not {kernel!r}")
        self.kernel = kernel

    @classmethod
    def from_pretrained(cls, ckpt_dir, device="cpu", dtype=None) -> "Transformer":
        """Load a Hugging Face Llama/Mistral folder (config.json + safetensors, sharded or not).
        Tensors go straight from the file into `dtype` on `device`; the model is built on the meta
        device first, so no second full copy of the weights is ever made. dtype=None keeps the file's."""
        ckpt_dir = Path(ckpt_dir)
        args = read_args(ckpt_dir)
        with torch.device("meta"):
            model = cls(args)
        state = load_state_dict(ckpt_dir, args, device, dtype)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if args.tie_embeddings:
            expected.pop("output.weight")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{ckpt_dir}: {len(missing)} weights missing from the safetensors files, "
                                  f"e.g. {missing[0]}; the download is incomplete or the config does not match")
        for name, shape in expected.items():
            if state[name].shape != shape:
                raise CheckpointError(f"{ckpt_dir}: weight {name} has shape {tuple(state[name].shape)} but "
                                      f"config.json implies {tuple(shape)}; config and weights disagree")
        model.load_state_dict(state, strict=False, assign=True)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.inv_freq = rope_inv_freq(args).to(device)
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Reading a checkpoint folder

def check_device(device: str) -> None:
    """For the command lines: a device this machine cannot run on fails at once, saying what to do."""
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device name at all, e.g. "gpu"
        dev = None
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0; use --device cuda")
    elif dev is None or dev.type != "cpu":  # mps, meta, ...: the model and kernels run on cpu and cuda only
        raise ValueError(f"--device {device} is not available here; use cpu or cuda")


def check_writable(path: Path, flag: str) -> None:
    """For the command lines: find out before the work, not after it, that `path` cannot be written."""
    folder = next(p for p in path.absolute().parents if p.exists())  # its folder, or where that will be made
    if path.is_dir():
        reason = f"{path} is a folder"
    elif not folder.is_dir():
        reason = f"{folder} is a file, not a folder"
    elif not os.access(folder, os.W_OK):
        reason = f"{folder} is not writable"
    else:
        return
    raise ValueError(f"cannot write {flag} {path}: {reason}; pass {flag} a file path somewhere writable")


def read_config(ckpt_dir: Path) -> dict:
    if ckpt_dir.is_file():
        hint = ckpt_dir.parent if ckpt_dir.name == "config.json" else "the folder holding config.json and *.safetensors"
        raise CheckpointError(f"{ckpt_dir} is a file, not a checkpoint folder; pass {hint}")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist; pass the folder holding "
                              f"config.json and *.safetensors")
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a Hugging Face checkpoint folder needs config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds a JSON {type(cfg).__name__}, not an object of settings; re-download it")
    return cfg


def read_args(ckpt_dir: Path) -> ModelArgs:
    return ModelArgs.from_hf_config(read_config(ckpt_dir), ckpt_dir / "config.json")


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = [ckpt_dir / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or no {tensor name: file name} map
            raise CheckpointError(f"{index} is corrupt: not JSON with a weight_map of tensor names to files; "
                                  f"re-download it") from None
    else:
        files = [ckpt_dir / "model.safetensors"]
    for f in files:
        if not f.is_file():
            if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pth")):
                raise CheckpointError(f"{f} is missing; only pickle weights (*.bin/*.pth) are here and they are "
                                      f"never loaded (unpickling runs code); download the safetensors files")
            raise CheckpointError(f"{f} is missing; download the model's safetensors weights into {ckpt_dir}")
    return files


# Hugging Face names -> ours. q/k/v are fused into wqkv and W_down is transposed, below.
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w_gate.weight",
    "mlp.up_proj.weight": "feed_forward.w_up.weight",
    "mlp.down_proj.weight": "feed_forward.w_down_t",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def our_name(hf_name: str) -> Optional[str]:
    if hf_name in HF_NAMES:
        return HF_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_NAMES:
        return f"layers.{parts[2]}.{HF_NAMES[parts[3]]}"
    return None


def load_state_dict(ckpt_dir: Path, args: ModelArgs, device, dtype) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open
    state, qkv = {}, {}
    for path in safetensors_files(ckpt_dir):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for hf_name in f.keys():
                    t = f.get_tensor(hf_name)
                    t = t.to(dtype) if dtype is not None else t
                    if ".self_attn." in hf_name and hf_name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                        qkv[hf_name] = t
                        continue
                    name = our_name(hf_name)
                    if name is None:
                        if "rotary_emb" in hf_name or (hf_name == "lm_head.weight" and args.tie_embeddings):
                            continue  # derived or tied tensors some exports carry along
                        raise CheckpointError(f"{path}: unexpected tensor {hf_name}; is this really a "
                                              f"{args.architecture} checkpoint?")
                    state[name] = t.t().contiguous() if name.endswith("w_down_t") else t
        except (SafetensorError, OSError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt, "
                                  f"re-download it") from None
    for i in range(args.n_layer):
        parts = [qkv.pop(f"model.layers.{i}.self_attn.{p}_proj.weight", None) for p in "qkv"]
        if all(p is not None for p in parts):
            if parts[0].shape[1] != parts[1].shape[1] or parts[1].shape != parts[2].shape:
                raise CheckpointError(f"{ckpt_dir}: layer {i} q/k/v projections have shapes "
                                      f"{[tuple(p.shape) for p in parts]} that disagree with config.json")
            state[f"layers.{i}.attention.wqkv.weight"] = torch.cat(parts)
    if qkv:
        raise CheckpointError(f"{ckpt_dir}: unexpected or incomplete attention tensors, e.g. {next(iter(qkv))}")
    return state


def save_pretrained(model: Transformer, ckpt_dir, config: dict) -> None:
    """Write `model` into the folder ckpt_dir as a Hugging Face checkpoint, the inverse of from_pretrained:
    HF names, wqkv split back into q/k/v_proj, w_down_t transposed back to down_proj, no lm_head when the
    embeddings are tied; one model.safetensors in the weights' own dtype. config: the source checkpoint's
    config.json (read_config), written back with its dtype set to the weights'. Files are written in
    place: for an all-or-nothing checkpoint, write into a temporary folder and rename it."""
    from safetensors.torch import save_file
    a = model.args
    ours_to_hf = {ours: hf for hf, ours in HF_NAMES.items()}
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and a.tie_embeddings:
            continue
        prefix, rest = "", name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            prefix = f"model.layers.{i}."
        if rest == "attention.wqkv.weight":
            q, k, v = t.split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim])
            tensors.update({f"{prefix}self_attn.{p}_proj.weight": w for p, w in zip("qkv", (q, k, v))})
        else:
            tensors[prefix + ours_to_hf[rest]] = t.t() if rest.endswith("w_down_t") else t
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config = {**config, "dtype": dtype}
    if "torch_dtype" in config:  # the older name of the same field
        config["torch_dtype"] = dtype
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
    (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece's tokenizer.model, or tokenizer.json through the optional `tokenizers`.

@dataclass
class Tokenizer:
    encode_fn: object  # (text, bos) -> ids
    decode_fn: object  # ids -> text
    bos_id: Optional[int]
    eos_id: Optional[int]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.encode_fn(text, bos)

    def decode(self, ids) -> str:
        return self.decode_fn(list(ids))


def load_tokenizer(ckpt_dir) -> Tokenizer:
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "tokenizer.model").is_file():
        from sentencepiece import SentencePieceProcessor
        try:
            sp = SentencePieceProcessor(model_file=str(ckpt_dir / "tokenizer.model"))
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt_dir / 'tokenizer.model'} is not a readable tokenizer ({e}); "
                                  f"re-download it") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        bos, eos = (bos if bos >= 0 else None), (eos if eos >= 0 else None)
        return Tokenizer(lambda s, b: ([bos] if b and bos is not None else []) + sp.encode(s), sp.decode, bos, eos)
    if (ckpt_dir / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise CheckpointError(f"{ckpt_dir} has only tokenizer.json; `pip install tokenizers` to read it") from None
        try:
            tok = HFTokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
            raise CheckpointError(f"{ckpt_dir / 'tokenizer.json'} is not a readable tokenizer ({e}); "
                                  f"re-download it") from None
        cfg = read_config(ckpt_dir)
        eos = cfg.get("eos_token_id")
        # tokenizer.json carries its own rule for the start of a text (Llama-3 adds <|begin_of_text|>,
        # SmolLM2 adds nothing): bos=True follows that rule, the convention the model was trained with.
        return Tokenizer(lambda s, b: tok.encode(s, add_special_tokens=b).ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=True),
                         cfg.get("bos_token_id"), eos[0] if isinstance(eos, list) else eos)
    raise CheckpointError(f"no tokenizer in {ckpt_dir}: expected tokenizer.model or tokenizer.json")
