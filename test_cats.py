"""The test suite: `pytest test_cats.py`.

Sections, in the order the code was built: the model against `transformers` (the oracle), CATS and
calibration, the Triton kernels against their PyTorch references. Without a GPU the kernels run in
Triton's CPU interpreter; tests that need ../shared (data, the real SmolLM2 checkpoint) skip with a
reason when it is absent.
"""
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernel.py is imported: Triton reads it then

import calibrate  # noqa: E402
import finetune  # noqa: E402
from cats import (ThresholdError, abs_histogram, available_sparsities, cats_activation,  # noqa: E402
                  default_threshold_path, load_thresholds, model_signature, read_threshold_file,
                  save_thresholds, thresholds_from_histogram)
from model import (CheckpointError, Transformer, load_tokenizer, read_config, rope_inv_freq,  # noqa: E402
                   save_pretrained)


# In CI the oracle tests must run: a missing transformers is a broken setup there, not a reason to skip.
# Elsewhere only the tests that need it skip (through need_transformers), the kernel tests still run.
try:
    import transformers
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but `transformers` is not installed; the oracle tests must not be skipped "
                           "in CI (pip install transformers pytest)") from None
    transformers = None


def need_transformers():
    pytest.importorskip("transformers", reason="the oracle tests need `pip install transformers`")


REPO = Path(__file__).resolve().parent
SHARED = Path(__file__).parent.parent / "shared"  # CI clones the repo into a folder with shared/ beside it
DATA = SHARED / "data"


def skip_loudly(reason: str):
    # pytest prints skip reasons only with -rs; a warning shows in the default summary, so nobody
    # mistakes "real-weights tests skipped" for "real-weights tests passed".
    warnings.warn(reason)
    pytest.skip(reason)


def shared_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        skip_loudly(f"{path} is absent (shared data lives in ../shared/data beside the repository)")
    return path


def random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice(".,;!?")
             for _ in range(n_words // 9)]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# model.py against transformers (the oracle), on small random checkpoints written by transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name -> (config class, overrides of BASE, test sequence length, save_pretrained kwargs)
CASES = {
    "llama-mha": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), 40, {}),
    "llama-gqa-tied": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True), 40, {}),
    # head_dim 16 gives rope wavelengths 6.3 ... 19869: with an original context of 32, low_freq_factor 1 and
    # high_freq_factor 4 there are high (< 8), medium (8 ... 32) and low (> 32) bands, and 80 tokens pass 32.
    "llama31-rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE), 80, {}),
    # window 8 on 24 tokens: most keys fall outside it; saved in shards, so the index file is read.
    "mistral-window-sharded": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8), 24, dict(max_shard_size="100KB")),
    "llama-head-dim": ("LlamaConfig", dict(head_dim=32, num_key_value_heads=2), 40, {}),  # 4 heads x 32 != 64
}


def randomize(hf_model, seed: int):
    """HF initialises with std 0.02, which makes logits tiny and a 1e-4 tolerance meaningless. Weights of
    scale 1/sqrt(fan_in) and norms around 1 give logits of order one, so a wrong op shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def save_hf(path: Path, config_class: str, overrides: dict, seed: int = 0, **save_kwargs):
    need_transformers()
    cfg = getattr(transformers, config_class)(**{**BASE, **overrides})
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    randomize(hf, seed)
    hf.save_pretrained(path, **save_kwargs)
    return hf


def load_hf(path: Path):
    # eager attention: the oracle computes attention the plain way, not through the same SDPA call as ours
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


class Case:
    def __init__(self, name, path, hf, T):
        self.name, self.path, self.hf, self.T = name, path, hf, T
        self.ours = Transformer.from_pretrained(path, dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        self.idx = torch.randint(0, BASE["vocab_size"], (2, T), generator=g)  # two different sequences
        with torch.no_grad():
            self.ref = hf(self.idx).logits


@pytest.fixture(scope="module", params=list(CASES))
def oracle(request, tmp_path_factory):
    config_class, overrides, T, save_kwargs = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    save_hf(path, config_class, overrides, **save_kwargs)
    return Case(request.param, path, load_hf(path), T)


@torch.no_grad()
def greedy(m: Transformer, prompt: list[int], n: int) -> list[int]:
    """Our own plain greedy loop over the KV cache: prefill, then one token at a time."""
    m.setup_caches(1, len(prompt) + n)
    logits = m(torch.tensor([prompt]), torch.arange(len(prompt)))
    out = []
    for i in range(n):
        out.append(logits[0, -1].argmax().item())
        logits = m(torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + i]))
    return out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    # eos_token_id=None: a random model may well produce token 2; we want exactly n tokens from both
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_close(out, ref, tol=1e-4):
    assert ref.abs().amax() > 1, "the reference logits are near zero: the test would prove nothing"
    err = (out - ref).abs().amax().item()
    assert err < tol, f"max abs difference {err:.3g} (tolerance {tol})"


# ---------------------------------------------------------------------------------------------------
# Oracle tests against transformers

@pytest.mark.parametrize("oracle", ["mistral-window-sharded"], indirect=True)
def test_sharded_case_is_really_sharded(oracle):
    assert (oracle.path / "model.safetensors.index.json").is_file() and len(list(oracle.path.glob("*.safetensors"))) > 1


def test_logits_match_transformers(oracle):
    with torch.no_grad():
        assert_close(oracle.ours(oracle.idx), oracle.ref)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_cached_decode_matches_transformers(oracle, path, monkeypatch):
    """Prefill half the sequence through the KV cache, then feed the rest one token at a time: through
    plain PyTorch, and through kernel.py's fused decode kernels (in the interpreter on a CPU)."""
    m, idx, T = oracle.ours, oracle.idx, oracle.T
    if path == "triton" and KDEV == "cuda":
        m, idx = copy.deepcopy(m).to(KDEV), idx.to(KDEV)
    calls = []
    real = kernel.attention_triton
    monkeypatch.setattr(kernel, "attention_triton", lambda *a: calls.append(1) or real(*a))
    P = T // 2
    m.setup_caches(2, T)
    m.set_kernel(path)
    try:
        with torch.no_grad():
            out = [m(idx[:, :P], torch.arange(P, device=idx.device))]
            for t in range(P, T):
                out.append(m(idx[:, t:t + 1], torch.tensor([t], device=idx.device)))
    finally:
        m.set_kernel("auto")
    assert len(calls) == (m.args.n_layer * (T - P) if path == "triton" else 0)
    assert_close(torch.cat(out, dim=1).cpu(), oracle.ref)


def test_greedy_generation_matches_transformers(oracle):
    # the prompt is long enough to pass the sliding window / llama3's original context before generating
    prompt = oracle.idx[0, :oracle.T - 10].tolist()
    assert greedy(oracle.ours, prompt, 10) == hf_greedy(oracle.hf, prompt, 10)


@pytest.mark.parametrize("oracle", ["llama31-rope"], indirect=True)
def test_rope_scaling_matters(oracle):
    """The llama3 case would prove nothing if the scaled frequencies equalled the plain ones."""
    m = oracle.ours
    scaled = m.inv_freq
    try:
        m.inv_freq = rope_inv_freq(dataclasses.replace(m.args, rope_scaling=None))
        with torch.no_grad():
            assert (m(oracle.idx) - oracle.ref).abs().amax() > 1e-2
    finally:
        m.inv_freq = scaled


def old_style(cfg: dict, type_key: str) -> dict:
    """config.json as transformers < 5 wrote it: top-level rope_theta, rope_scaling, often no head_dim."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {type_key: rope_type, **rope}
    if cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]:
        del cfg["head_dim"]
    return cfg


@pytest.mark.parametrize("name,type_key,rope_scaling", [
    ("llama31-rope", "rope_type", None),
    ("llama31-rope", "type", None),  # the legacy key
    ("llama-mha", "rope_type", None),  # no scaling: only the top-level rope_theta (500, not the default)
    ("llama-mha", "type", {"type": "linear", "factor": 4.0}),
])
def test_old_style_rope_config(tmp_path, tmp_path_factory, name, type_key, rope_scaling):
    config_class, overrides, T, _ = CASES[name]
    src = tmp_path_factory.mktemp(name + "-new")
    new_hf = save_hf(src, config_class, overrides)
    cfg = old_style(json.loads((src / "config.json").read_text()), type_key)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(src / "model.safetensors", tmp_path)
    idx = torch.randint(0, BASE["vocab_size"], (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)(idx)
        assert_close(ours, load_hf(tmp_path)(idx).logits)
        if rope_scaling is None:  # same model as the new-style folder: the same logits
            assert_close(ours, new_hf(idx).logits)
        else:  # linear scaling changes the model, visibly
            assert (ours - new_hf(idx).logits).abs().amax() > 1e-2


# ---------------------------------------------------------------------------------------------------
# Tokenizers

def write_config(path: Path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **fields}))


def check_round_trip(tok, lines):
    for line in lines:
        assert tok.decode(tok.encode(line, bos=True)) == line
        assert tok.decode(tok.encode(line, bos=False)) == line


def test_sentencepiece_llama2(tmp_path):
    model_file, wiki = shared_file("llama2-tokenizer.model"), shared_file("wikitext-2-raw-test.txt")
    write_config(tmp_path, bos_token_id=1, eos_token_id=2)
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("Hello world", bos=True)
    assert ids[0] == 1 and ids[1:] == tok.encode("Hello world", bos=False) and 1 not in ids[1:]
    lines = [l for l in wiki.read_text(encoding="utf-8").split("\n")[:200] if l.strip()]
    assert len(lines) > 50
    check_round_trip(tok, lines)


def test_sentencepiece_trained_in_test(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = random_text(18000, seed=3)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=proto, vocab_size=100,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    write_config(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    lines = text.splitlines()[:50]
    assert tok.encode(lines[0], bos=True)[0] == 1 and tok.encode(lines[0], bos=False)[0] != 1
    assert max(max(tok.encode(l)) for l in lines) < 100
    check_round_trip(tok, lines)


def bpe_tokenizer(text: str, bos_rule: bool):
    """A byte-level BPE tokenizer.json trained here; with bos_rule it starts every text with <s>, as
    Llama-3's does, without it adds nothing, as SmolLM2's does."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    if bos_rule:
        tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.mark.parametrize("bos_rule", [True, False])
def test_tokenizer_json(tmp_path, bos_rule):
    text = random_text(4500, seed=4)
    bpe_tokenizer(text, bos_rule).save(str(tmp_path / "tokenizer.json"))
    write_config(tmp_path, bos_token_id=0, eos_token_id=[1, 2])  # ids come from config.json; a list means "any"
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    lines = text.splitlines()[:50]
    with_bos, without = tok.encode(lines[0], bos=True), tok.encode(lines[0], bos=False)
    assert 0 not in without and len(without) > 1
    assert with_bos == ([0] + without if bos_rule else without)  # bos=True follows tokenizer.json's own rule
    check_round_trip(tok, lines)


def test_no_tokenizer_is_a_checkpoint_error(tmp_path):
    write_config(tmp_path)
    check_error(lambda: load_tokenizer(tmp_path), "tokenizer")


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear line, never a traceback from deep inside a library

def check_error(fn, *words):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg.strip() and len(msg) < 400, f"not one short line: {msg!r}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    """A valid small checkpoint, unsharded and sharded; each test breaks its own copy."""
    root = tmp_path_factory.mktemp("good")
    save_hf(root / "single", "LlamaConfig", {})
    save_hf(root / "sharded", "LlamaConfig", {}, max_shard_size="100KB")
    for d in ("single", "sharded"):
        Transformer.from_pretrained(root / d)  # the copies below are broken, not these
    return root


def broken_copy(good_ckpt, tmp_path, which="single") -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(good_ckpt / which, d)
    return d


def edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_missing_folder(tmp_path):
    check_error(lambda: Transformer.from_pretrained(tmp_path / "nope"), "nope", "does not exist")


def test_missing_config(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    (d / "config.json").unlink()
    check_error(lambda: Transformer.from_pretrained(d), "config.json", "missing")


def test_config_not_json(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    check_error(lambda: Transformer.from_pretrained(d), "config.json", "not valid JSON")


def test_missing_weights(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    (d / "model.safetensors").unlink()
    check_error(lambda: Transformer.from_pretrained(d), "model.safetensors", "missing")


def test_missing_shard(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path, "sharded")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    check_error(lambda: Transformer.from_pretrained(d), shard.name, "missing")


def test_only_pickle_weights(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    check_error(lambda: Transformer.from_pretrained(d), "pickle")


def test_truncated_weights(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # an interrupted download
    check_error(lambda: Transformer.from_pretrained(d), "model.safetensors", "truncated or corrupt")


@pytest.mark.parametrize("where", ["all", "header"])
def test_corrupt_weights(good_ckpt, tmp_path, where):
    d = broken_copy(good_ckpt, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    garbage = random.Random(5).randbytes(len(data))
    if where == "all":
        data[:] = garbage
    else:  # the length prefix is intact, the JSON header after it is not
        data[8:200] = garbage[8:200]
    f.write_bytes(bytes(data))
    check_error(lambda: Transformer.from_pretrained(d), "model.safetensors", "truncated or corrupt")


def test_shape_disagrees_with_config(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    edit_config(d, intermediate_size=BASE["intermediate_size"] + 32)
    check_error(lambda: Transformer.from_pretrained(d), "shape", "config")


def test_heads_disagree_with_config(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    edit_config(d, num_key_value_heads=2)
    check_error(lambda: Transformer.from_pretrained(d), "config")


@pytest.mark.parametrize("arch,model_type", [("GPT2LMHeadModel", "gpt2"), ("Qwen2ForCausalLM", "qwen2")])
def test_unsupported_architecture(good_ckpt, tmp_path, arch, model_type):
    d = broken_copy(good_ckpt, tmp_path)
    edit_config(d, architectures=[arch], model_type=model_type)
    check_error(lambda: Transformer.from_pretrained(d), "unsupported architecture", arch)


# ---------------------------------------------------------------------------------------------------
# generate.py on the command line: bad input gives one "error:" line on stderr and exit code 1

@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    """A tiny checkpoint with a tokenizer.json and a 16-token context."""
    d = tmp_path_factory.mktemp("cli")
    tok = bpe_tokenizer(random_text(4500, seed=6), bos_rule=True)
    tok.save(str(d / "tokenizer.json"))
    save_hf(d, "LlamaConfig", dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=1))
    return d


def run_generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny model


def check_cli_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, f"exit code {r.returncode}, stderr: {r.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one 'error:' line: {r.stderr[-2000:]!r}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def test_cli_generates(cli_ckpt):
    # the baseline the failure tests rely on: this checkpoint and command line work
    r = run_generate("--ckpt", cli_ckpt, "--prompt", "ab cd", "--max-new-tokens", 4, "--device", "cpu",
                     "--temperature", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ab cd" in r.stdout  # the prompt is echoed before the completion


def test_cli_prompt_longer_than_context(cli_ckpt):
    r = run_generate("--ckpt", cli_ckpt, "--prompt", random_text(90, seed=7), "--max-new-tokens", 4, "--device", "cpu")
    check_cli_error(r, "context")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid here")
def test_cli_cuda_without_gpu(cli_ckpt):
    check_cli_error(run_generate("--ckpt", cli_ckpt, "--device", "cuda"), "cuda")


def test_cli_missing_checkpoint(tmp_path):
    check_cli_error(run_generate("--ckpt", tmp_path / "nope", "--device", "cpu"), "nope")


# ---------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M (LlamaForCausalLM, GQA, tied embeddings), from ../shared/tools/get-smollm2

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    script = SHARED / "tools" / "get-smollm2"
    if not script.is_file():
        skip_loudly(f"{script} is absent: the SmolLM2-135M tests need ../shared beside the repository")
    try:  # a no-op when the folder already exists; otherwise a download and a conversion
        r = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        skip_loudly(f"{script} took more than 15 minutes; SmolLM2-135M tests skipped")
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        skip_loudly(f"{script} failed (exit {r.returncode}: {tail}); SmolLM2-135M tests skipped")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(ours, transformers', tokenizer), fp32 on the CPU."""
    need_transformers()
    ours = Transformer.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, hf, load_tokenizer(smollm2_dir)


def test_smollm2_knows_paris(smollm2):
    ours, hf, tok = smollm2
    prompt = tok.encode("The capital of France is", bos=True)
    # SmolLM2's tokenizer.json adds no BOS (its id 1 is <|im_start|>, a chat marker): bos=True follows that.
    assert prompt == tok.encode("The capital of France is", bos=False) and tok.bos_id not in prompt
    out = greedy(ours, prompt, 8)
    assert tok.decode(out).startswith(" Paris"), tok.decode(out)
    assert out == hf_greedy(hf, prompt, 8)


def test_smollm2_wikitext_perplexity_matches_transformers(smollm2, smollm2_dir):
    """WikiText-2 test, the first 20 non-overlapping 1024-token windows, fp32: ours within 0.1% of HF's."""
    ours, hf, tok = smollm2
    text = shared_file("wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, bos=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    n, T = 20, 1024
    windows = torch.tensor(ids[: n * T]).view(n, T)
    # one thread (the autouse fixture): on this shared 2-core machine two threads ran 3x slower, not 2x faster
    nll_ours = nll_hf = 0.0
    with torch.inference_mode():
        for w in windows:  # one window at a time: 1024 x 49152 fp32 logits are 200 MB per model
            w = w[None]
            nll_ours += F.cross_entropy(ours(w)[0, :-1], w[0, 1:], reduction="sum").item()
            nll_hf += F.cross_entropy(hf(w).logits[0, :-1], w[0, 1:], reduction="sum").item()
    ppl_ours, ppl_hf = (torch.tensor([nll_ours, nll_hf]) / (n * (T - 1))).exp().tolist()
    print(f"SmolLM2-135M WikiText-2 perplexity, {n} x {T} tokens: ours {ppl_ours:.4f}, transformers {ppl_hf:.4f}")
    assert 10 < ppl_hf < 60, "transformers' own figure is off: the checkpoint is broken"
    assert abs(ppl_ours / ppl_hf - 1) < 1e-3


MEMORY_PROBE = textwrap.dedent("""
    import sys, torch, safetensors.torch
    sys.path.insert(0, sys.argv[2])
    import model

    def peak_rss():
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (it survives fork and exec)
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

    before = peak_rss()
    m = model.Transformer.from_pretrained(sys.argv[1], device="cpu", dtype=torch.bfloat16)
    print(before, peak_rss())
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_smollm2_load_peak_memory(smollm2_dir):
    """Loading must not hold much more than one extra copy of the weights at any moment."""
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(smollm2_dir), str(REPO)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split())
    file_bytes = sum(f.stat().st_size for f in smollm2_dir.glob("*.safetensors"))
    print(f"SmolLM2-135M bf16 load: file {file_bytes / 2**20:.0f} MiB, peak RSS {before / 2**20:.0f} -> "
          f"{after / 2**20:.0f} MiB (+{(after - before) / 2**20:.0f} MiB)")
    assert 0.5 * file_bytes < after - before < 2 * file_bytes  # the lower bound: the probe measures something


# ---------------------------------------------------------------------------------------------------
# cats.py and calibrate.py

SEQ_LEN, CALIB_TOKENS = 128, 2048


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, calibration text file) of a 3-layer random Llama."""
    transformers = pytest.importorskip("transformers")
    tk = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("tiny-llama")
    data = d / "text.txt"
    data.write_text(random_text(8000, seed=0))

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train([str(data)], tk.trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                  initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))

    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=192,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                                   initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(d)
    return d, data


@pytest.fixture(scope="module")
def model(tiny):
    return Transformer.from_pretrained(tiny[0], dtype=torch.float32)


def calib_windows(tiny):
    return calibrate.token_windows(load_tokenizer(tiny[0]), [tiny[1]], CALIB_TOKENS, SEQ_LEN)


# ---------------------------------------------------------------------------------------------------
# The activation and the quantile maths

def test_cats_activation_compares_magnitude_in_fp32():
    g = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.bfloat16)
    # 0.99999 rounds to 1.0 in bf16: a bf16 compare would zero the +-1.0 entries.
    out = cats_activation(g, torch.tensor(0.99999))
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, -1.0, 0.0, -2.0]
    assert cats_activation(g, torch.tensor(1.0)).tolist() == [0.0, 0.0, 0.0, -2.0]  # |v| <= t is zeroed


@torch.no_grad()
def test_quantiles_match_torch_quantile(tiny, model):
    windows = calib_windows(tiny)
    assert windows.shape == (CALIB_TOKENS // SEQ_LEN, SEQ_LEN) and (windows[:, 0] == 0).all()  # BOS first
    hist = calibrate.gate_histograms(model, windows)
    acts = [[] for _ in model.layers]  # small enough here to keep every activation
    with calibrate.gate_hooks(model, lambda i, v: acts[i].append(v.abs().flatten())):
        for w in windows:
            model(w[None])
    acts = [torch.cat(a).double() for a in acts]
    assert hist.sum(-1).tolist() == [a.numel() for a in acts]
    for s in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        t, realised, bound = thresholds_from_histogram(hist, s)
        for i, a in enumerate(acts):
            frac = (a <= t[i].double()).double().mean().item()
            assert frac == pytest.approx(realised[i].item(), abs=1e-12)  # the file's figure is exact
            assert abs(frac - s) <= bound[i].item() + 1e-12
            assert abs(frac - s) < 1e-3  # within 0.1 percentage point
            q = torch.quantile(a, s).item()
            assert t[i].item() == pytest.approx(q, rel=2 ** -9)  # a bin is 2^-11 of its value wide


def test_quantile_bound_holds_with_ties():
    # bf16 values: many equal values, so the crossing bin can hold a lot of mass; the bound says how much.
    torch.manual_seed(0)
    v = torch.randn(100_000).mul(3).to(torch.bfloat16)
    hist = abs_histogram(v)[None]
    for s in (0.05, 0.3, 0.5, 0.7, 0.9):
        t, realised, bound = thresholds_from_histogram(hist, s)
        frac = (v.abs().float() <= t[0]).double().mean().item()
        assert frac == pytest.approx(realised[0].item(), abs=1e-12)
        assert abs(frac - s) <= bound[0].item() + 1e-12
        assert (cats_activation(v, t[0]) == 0).double().mean().item() == pytest.approx(frac, abs=1e-12)
    with pytest.raises(ValueError):
        thresholds_from_histogram(hist, 1.0)


@torch.no_grad()
def test_cats_mlp_matches_formula_in_fp64(model):
    torch.manual_seed(1)
    ff = model.layers[1].feed_forward
    x = torch.randn(2, 7, model.args.dim)
    x64, wg, wu, wd_t = (a.double() for a in (x, ff.w_gate.weight, ff.w_up.weight, ff.w_down_t))
    g = F.silu(x64 @ wg.T)
    # t in the widest gap among the middle values of |g|: fp32 rounding cannot move any value across it
    mags = g.abs().flatten().sort().values
    mid = mags[len(mags) * 4 // 10 : len(mags) * 6 // 10]
    j = (mid[1:] - mid[:-1]).argmax()
    t = ((mid[j] + mid[j + 1]) / 2).item()
    expected = (torch.where(g.abs() > t, g, 0.0) * (x64 @ wu.T)) @ wd_t
    try:
        model.set_thresholds(torch.full((model.args.n_layer,), t), kernel="torch")
        out = ff(x)
    finally:
        model.set_thresholds(None)
    assert 0.35 < (g.abs() <= t).double().mean() < 0.65
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_full_forward_matches_cached_decode_with_cats(tiny, model):
    idx = calib_windows(tiny)[:1, :40]
    t, _, _ = thresholds_from_histogram(calibrate.gate_histograms(model, idx), 0.5)
    t = t * (0.9 + 0.2 * torch.rand(len(t), generator=torch.Generator().manual_seed(0)))  # ~50%, not exact
    try:
        model.set_thresholds(t, kernel="torch")
        full = model(idx)
        model.setup_caches(1, 40)
        steps = [model(idx[:, :16], torch.arange(16))]
        steps += [model(idx[:, p : p + 1], torch.tensor([p])) for p in range(16, 40)]
        _, zeros = calibrate.evaluate(model, idx)
    finally:
        model.set_thresholds(None)
        for layer in model.layers:
            layer.attention.kv_cache = None
    assert ((zeros > 0.3) & (zeros < 0.7)).all()  # CATS really is on
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Threshold files

def test_threshold_file_round_trip(tmp_path, model):
    path = tmp_path / "thr.safetensors"
    thr = {0.5: torch.rand(model.args.n_layer), 0.7: torch.rand(model.args.n_layer) + 1}
    save_thresholds(path, thr, {**model_signature(model), "mode": "dense", "tokens": 2048,
                                "data": [{"path": "x.txt", "sha256": "ab"}]})
    assert available_sparsities(path) == [0.5, 0.7]
    for s, t in thr.items():
        loaded = load_thresholds(path, s, model_signature(model))
        assert loaded.dtype == torch.float32 and torch.equal(loaded, t)
    _, meta = read_threshold_file(path)
    assert meta["mode"] == "dense" and json.loads(meta["tokens"]) == 2048
    assert json.loads(meta["data"])[0]["sha256"] == "ab"
    assert default_threshold_path("/some/ckpt") == Path("/some/ckpt/cats_thresholds.safetensors")


def test_fingerprint_ignores_dtype_but_not_weights(tiny, model):
    bf16 = Transformer.from_pretrained(tiny[0], dtype=torch.bfloat16)
    assert model_signature(bf16) == model_signature(model)
    with torch.no_grad():
        bf16.layers[2].feed_forward.w_up.weight.mul_(1.05)
    assert model_signature(bf16)["fingerprint"] != model_signature(model)["fingerprint"]


def test_threshold_file_refuses_other_models_and_missing_levels(tmp_path, model):
    path = tmp_path / "thr.safetensors"
    sig = model_signature(model)
    save_thresholds(path, {0.5: torch.rand(model.args.n_layer)}, sig)
    cases = [
        (0.5, {**sig, "fingerprint": "0123456789abcdef"}, "another model"),
        (0.5, {**sig, "n_layer": 32}, "another model"),
        (0.6, sig, "--sparsity 0.6"),
    ]
    for s, expect, says in cases:
        with pytest.raises(ThresholdError, match=says) as e:
            load_thresholds(path, s, expect)
        assert "\n" not in str(e.value)
    with pytest.raises(ThresholdError, match="no threshold file"):
        load_thresholds(tmp_path / "missing.safetensors", 0.5, sig)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ThresholdError, match="not a readable"):
        load_thresholds(tmp_path / "junk.safetensors", 0.5, sig)


def test_threshold_file_written_atomically(tmp_path, monkeypatch):
    import safetensors.torch
    path = tmp_path / "thr.safetensors"
    save_thresholds(path, {0.5: torch.ones(3)}, {"n_layer": 3})
    before = path.read_bytes()

    def crash_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_thresholds(path, {0.5: torch.zeros(3)}, {"n_layer": 3})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


# ---------------------------------------------------------------------------------------------------
# calibrate.py from the command line

def table_rows(stdout: str, first: str) -> list[list[str]]:
    """Rows of the markdown table whose header starts with `first`, split into cells."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first} "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_calibrate_end_to_end(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "thr.safetensors"
    levels = [0.3, 0.5, 0.7, 0.9]
    r = subprocess.run([sys.executable, str(REPO / "calibrate.py"), "--ckpt", str(ckpt), "--data", str(data),
                        "--tokens", str(CALIB_TOKENS), "--seq-len", str(SEQ_LEN), "--device", "cpu",
                        "--sparsity", *map(str, levels), "--out", str(out), "--mode", "dense",
                        "--eval", str(data), "--eval-tokens", str(CALIB_TOKENS)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny model: threads only contend
    assert r.returncode == 0, r.stderr
    assert "calibrating: 16/16 windows" in r.stderr and "evaluating sparsity 0.9: 16/16" in r.stderr  # progress
    _, meta = read_threshold_file(out)
    assert meta["mode"] == "dense" and meta["tokens"] == str(CALIB_TOKENS) and meta["seq_len"] == str(SEQ_LEN)
    assert json.loads(meta["data"]) == [{"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert available_sparsities(out) == levels

    rows = table_rows(r.stdout, "sparsity")
    assert [row[0] for row in rows] == ["dense"] + [f"{s:g}" for s in levels]
    dense_ppl = float(rows[0][1])
    assert 1 < dense_ppl < 2 * 400  # a random model over a ~400-token vocabulary
    for s, row in zip(levels, rows[1:]):
        assert float(row[3]) == pytest.approx(s, abs=0.05)  # mean over layers, CATS on everywhere

    # On the calibration tokens with CATS on: layer 0 sees exactly its calibration inputs, so it hits the
    # target within the stated bound; deeper layers see the sparsified model's activations and drift a little.
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    bound, realised = json.loads(meta["bound"]), json.loads(meta["realised"])
    for s in levels:
        model.set_thresholds(load_thresholds(out, s, model_signature(model)), kernel="torch")
        _, zeros = calibrate.evaluate(model, calib_windows(tiny))
        assert abs(zeros[0].item() - s) <= bound[f"{s:g}"] + 1e-12
        assert zeros[0].item() == pytest.approx(realised[f"{s:g}"][0], abs=1e-12)
        assert (zeros - s).abs().max() < 0.05


def fails_with_one_line(main, argv, says, capsys):
    """main(argv) exits 1 having printed one line "error: ... says ..." last, and no other error or traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1], err
    assert all(not l.startswith(("error", "Traceback")) for l in err[:-1])


@pytest.mark.parametrize("case", ["sparsity-1", "sparsity-negative", "missing-data", "missing-eval",
                                  "missing-ckpt", "too-little-text", "no-threshold-file", "nothing-to-do"])
def test_calibrate_bad_input_fails_cleanly(tiny, tmp_path, capsys, case):
    ckpt, data = tiny
    out = tmp_path / "thr.safetensors"
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    base = ["--ckpt", str(ckpt), "--data", str(data), "--tokens", "256", "--seq-len", "128", "--out", str(out)]
    argv, says = {
        "sparsity-1": (base + ["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
        "sparsity-negative": (base + ["--sparsity", "0.5", "-0.1"], "--sparsity must be in [0, 1)"),
        "missing-data": (base[:3] + [str(tmp_path / "nope.txt")] + base[4:], "nope.txt does not exist"),
        "missing-eval": (base + ["--eval", str(tmp_path / "nope.txt")], "nope.txt does not exist"),
        "missing-ckpt": (["--ckpt", str(tmp_path / "nockpt")] + base[2:], "does not exist"),
        "too-little-text": (base[:3] + [str(short)] + base[4:], "less than one 128-token window"),
        "no-threshold-file": (base[:2] + ["--eval", str(data)] + base[6:] + ["--sparsity", "0.6"], "no threshold file"),
        "nothing-to-do": (["--ckpt", str(ckpt)], "nothing to do"),
    }[case]
    fails_with_one_line(calibrate.main, argv, says, capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_eval_refuses_level_missing_from_file(tiny, tmp_path, model, capsys):
    out = tmp_path / "thr.safetensors"
    save_thresholds(out, {0.5: torch.full((model.args.n_layer,), 0.01)}, model_signature(model))
    with pytest.raises(SystemExit):
        calibrate.main(["--ckpt", str(tiny[0]), "--eval", str(tiny[1]), "--seq-len", "128", "--out", str(out),
                        "--sparsity", "0.5", "0.6"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "holds thresholds for sparsity 0.5, not 0.6" in err and "--sparsity 0.6" in err


# ---------------------------------------------------------------------------------------------------
# calibrate.py --mode sequential: thresholds that hold their sparsity with CATS on in every layer

@pytest.fixture(scope="module")
def offset_model(tiny):
    """The tiny model with a vector added to every token embedding (3x the tokens' own spread) and MLP
    outputs 4x larger. With isotropic random weights CATS hardly moves later layers' activations (RMSNorm
    removes the scale, and the zeroed terms average out); real models carry a large component common to
    all tokens, and zeroing small gates changes it. This model does too, so dense-mode thresholds drift."""
    m = Transformer.from_pretrained(tiny[0], dtype=torch.float32)
    with torch.no_grad():
        m.tok_embeddings.weight.add_(0.3 * torch.randn(m.args.dim, generator=torch.Generator().manual_seed(1)))
        for layer in m.layers:
            layer.feed_forward.w_down_t.mul_(4)
    return m


def realised_with_cats(model, windows, thresholds):
    """Fraction of gate activations CATS zeroes in each layer, CATS on in every layer."""
    try:
        model.set_thresholds(thresholds, kernel="torch")
        return calibrate.evaluate(model, windows)[1]
    finally:
        model.set_thresholds(None)


@torch.no_grad()
def test_sequential_thresholds_hold_with_cats_on_where_dense_ones_drift(tiny, offset_model):
    windows = calib_windows(tiny)
    hist = calibrate.gate_histograms(offset_model, windows)
    for s in (0.5, 0.7):
        dense, _, _ = thresholds_from_histogram(hist, s)
        seq, realised, bound = calibrate.sequential_thresholds(offset_model, windows, s)
        dense_zeros = realised_with_cats(offset_model, windows, dense)
        seq_zeros = realised_with_cats(offset_model, windows, seq)
        assert (dense_zeros - s).abs().max() > 0.01  # dense mode misses by more than a percentage point
        assert (seq_zeros - s).abs().max() < 1e-3  # sequential: within 0.1 percentage point, every layer
        assert ((seq_zeros - s).abs() <= bound.double() + 1e-12).all()
        # The returned fractions are what CATS really zeroes: the calibration ran the model's own maths.
        assert torch.equal(seq_zeros, realised.double())
        assert seq[0] == dense[0]  # layer 0 sees the same inputs in both modes


@torch.no_grad()
def test_sequential_calibration_is_the_models_own_maths(tmp_path):
    """Sliding-window attention (window 8 on 32-token windows) and bf16 as well as fp32: the fractions that
    sequential calibration stores are exactly those CATS zeroes when the model itself runs, every layer."""
    save_hf(tmp_path, "MistralConfig", dict(num_key_value_heads=2, sliding_window=8, num_hidden_layers=3))
    windows = torch.randint(0, BASE["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        m = Transformer.from_pretrained(tmp_path, dtype=dtype)
        for s in (0.5, 0.7):
            t, realised, _ = calibrate.sequential_thresholds(m, windows, s)
            assert torch.equal(realised_with_cats(m, windows, t), realised.double()), (dtype, s)


def test_sequential_calibration_runs_two_passes_per_layer(tiny, model):
    windows = calib_windows(tiny)
    calls = {"attention": [0] * model.args.n_layer, "w_gate": [0] * model.args.n_layer}

    def counter(name, i):
        def hook(mod, inp, out):
            calls[name][i] += 1
        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.attention.register_forward_hook(counter("attention", i)))
        handles.append(layer.feed_forward.w_gate.register_forward_hook(counter("w_gate", i)))
    try:
        calibrate.sequential_thresholds(model, windows, 0.5)
    finally:
        for h in handles:
            h.remove()
    n = len(windows)  # attention once per window, W_gate twice (histogram, then the CATS MLP): ~1.2 forwards
    assert calls == {"attention": [n] * model.args.n_layer, "w_gate": [2 * n] * model.args.n_layer}
    assert all(layer.feed_forward.threshold is None for layer in model.layers)  # dense again afterwards


def test_calibrate_modes_from_the_command_line(tiny, model, tmp_path, capsys):
    ckpt, data = tiny
    levels = [0.3, 0.7]
    common = ["--ckpt", str(ckpt), "--data", str(data), "--tokens", str(CALIB_TOKENS), "--seq-len", str(SEQ_LEN),
              "--device", "cpu", "--sparsity", *map(str, levels)]
    calibrate.main(common + ["--out", str(tmp_path / "sequential.safetensors")])  # the default mode
    out, err = capsys.readouterr()
    assert "calibrating 0.7 sequentially: 3/3 layers" in err and "sequential mode" in out
    assert "with CATS on in every layer" in out
    calibrate.main(common + ["--out", str(tmp_path / "dense.safetensors"), "--mode", "dense"])
    out, err = capsys.readouterr()
    assert "calibrating: 16/16 windows" in err and "dense mode" in out
    windows = calib_windows(tiny)
    for mode in ("sequential", "dense"):
        path = tmp_path / f"{mode}.safetensors"
        _, meta = read_threshold_file(path)
        assert meta["mode"] == mode  # the file says which mode made it
        assert available_sparsities(path) == levels
        realised = json.loads(meta["realised"])
        for s in levels:
            zeros = realised_with_cats(model, windows, load_thresholds(path, s, model_signature(model)))
            if mode == "sequential":  # the stored fractions are what CATS zeroes on the calibration tokens
                assert zeros.tolist() == realised[f"{s:g}"]
                assert (zeros - s).abs().max() < 1e-3
            else:  # the stored fractions are the dense model's; layer 0 sees the same model either way
                assert zeros[0].item() == realised[f"{s:g}"][0]


# ---------------------------------------------------------------------------------------------------
# kernel.py: every Triton kernel against its plain-PyTorch reference in fp64. On a machine without a
# GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set at the top of this file before
# kernel.py is imported); on a GPU they run for real.

import kernel  # noqa: E402  (after TRITON_INTERPRET is set)
import triton  # noqa: E402

KDEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "an output element was never written (still NaN poison)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def mlp_weights(d, ffn, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(ffn, d, generator=g) / s for s in (d ** 0.5, d ** 0.5, ffn ** 0.5)]
    x = lambda B: torch.randn(B, d, generator=g).to(KDEV, dtype)  # noqa: E731
    return x, [w.to(KDEV, dtype) for w in ws]


def threshold_in_gap(x, w_gate, active):
    """A threshold leaving about `active` of |SiLU(W_gate x)| above it, placed mid-way in the widest
    gap between neighbouring values there, so fp32 rounding in the kernel cannot flip a neuron."""
    g = torch.nn.functional.silu(x.double() @ w_gate.double().T).abs().flatten().sort().values.cpu()
    if active >= 1:
        return -1.0
    if active <= 0:
        return float("inf")
    n = min(64, len(g) // 4)
    lo = max(0, min(int(len(g) * (1 - active)), len(g) - n - 1))
    j = lo + int(torch.argmax(g[lo + 1: lo + n + 1] - g[lo: lo + n]))
    return float((g[j] + g[j + 1]) / 2)


def poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), device=KDEV, dtype=dtype)


def big_blocks(monkeypatch):
    """The interpreter pays per program, not per byte: on CPU, the 7B shape runs the same code with
    fewer, larger blocks."""
    monkeypatch.setattr(kernel, "gemv_config", lambda D, N: dict(BLOCK_N=256, programs=8, num_warps=4))
    monkeypatch.setattr(kernel, "mlp_config", lambda D, F, sparse: dict(BLOCK_N=256, programs=6, num_warps=4))
    monkeypatch.setattr(kernel, "gate_up_config", lambda *_: dict(BLOCK_N=512, BLOCK_K=1024, num_warps=4, num_stages=3))
    monkeypatch.setattr(kernel, "down_config", lambda B, D, F: dict(BLOCK_D=1024, BLOCK_J=1024, ROWS_PER_PROG=4096,
                                                                    SPLITS=triton.cdiv(F, 4096), num_warps=4, num_stages=3))
    monkeypatch.setattr(kernel, "linear_config", lambda *_: dict(BLOCK_N=512, BLOCK_K=1024, num_warps=4, num_stages=1))


KERNEL_CASES = [  # (d, ffn, B, dtype): odd sizes, SmolLM2's, 7B shapes; every dtype; 1 to 8 tokens
    (37, 53, 1, torch.float32), (37, 53, 8, torch.bfloat16), (37, 53, 5, torch.float16), (37, 53, 1, torch.bfloat16),
    (37, 1101, 1, torch.float32),  # one token: several blocks a program, the last one partial
    (1000, 2750, 3, torch.bfloat16), (1000, 2750, 1, torch.float32), (1000, 2750, 8, torch.float16),
    (576, 1536, 2, torch.bfloat16), (576, 1536, 7, torch.float32), (576, 1536, 1, torch.float16),
    (4096, 11008, 1, torch.bfloat16), (4096, 14336, 1, torch.bfloat16), (4096, 11008, 2, torch.float32),
]


@pytest.mark.parametrize("d,ffn,B,dtype", KERNEL_CASES)
def test_cats_mlp_kernels_match_fp64_reference(d, ffn, B, dtype, monkeypatch):
    if KDEV == "cpu" and d * ffn > 4e6:
        big_blocks(monkeypatch)
    x_of, (w_gate, w_up, w_down_t) = mlp_weights(d, ffn, dtype, seed=d + B)
    x = x_of(B)
    ref_args = [a.double() for a in (x, w_gate, w_up, w_down_t)]
    # 0% and 100% active on the small shapes; the larger ones (slow in the interpreter) at ~50%
    for active in (0.5, 0.0, 1.0, 0.1) if d * ffn < 1e5 or KDEV == "cuda" else (0.5,):
        t = kernel.as_threshold(threshold_in_gap(x, w_gate, active), KDEV)
        _, need_ref = kernel.gate_reference(ref_args[0], ref_args[1], t)
        h_ref = kernel.gate_up_reference(*ref_args[:3], t)
        # each stage on its own, its output poisoned before the launch
        if B == 1:
            # the rows of dropped neurons poisoned too: the kernel must not read them
            dropped = ~need_ref.to(KDEV)
            w_up_p, w_down_p = w_up.clone(), w_down_t.clone()
            w_up_p[dropped], w_down_p[dropped] = float("nan"), float("nan")
            programs = kernel.persistent_programs(kernel.mlp_config(d, ffn, sparse=True), ffn)
            part = kernel.mlp(x, w_gate, w_up_p, w_down_p, t, part=poisoned(programs, d))
        else:
            h = kernel.gate_up(x, w_gate, w_up, t, h=poisoned(B, ffn))
            assert rel_err(h, h_ref) < TOL[dtype] if active > 0 else (h == 0).all()
            part = kernel.down(h, w_down_t, part=poisoned(kernel.down_config(B, d, ffn)["SPLITS"], B, d))
        if active > 0:
            assert rel_err(part.sum(0).view(B, d), kernel.down_reference(h_ref, ref_args[3])) < TOL[dtype]
        out = kernel.reduce(part, poisoned(B, d, dtype=dtype))
        assert out.dtype == dtype and out.shape == (B, d)
        if active > 0:
            assert rel_err(out, kernel.cats_mlp_reference(*ref_args, t)) < TOL[dtype], active
        else:
            assert (out == 0).all()  # nothing active: nothing read, exact zeros
    # and the public entry point (custom op) on the last threshold
    torch.testing.assert_close(kernel.cats_mlp(x, w_gate, w_up, w_down_t, t), out, rtol=0, atol=0)


@pytest.mark.parametrize("n,d,B,dtype", [(53, 37, 1, torch.float32), (1101, 37, 1, torch.bfloat16),
                                         (53, 37, 8, torch.bfloat16), (1000, 576, 3, torch.float16),
                                         (4096, 4096, 1, torch.bfloat16), (6144, 4096, 1, torch.float32),
                                         (12288, 4096, 1, torch.bfloat16), (49152, 576, 2, torch.bfloat16)])
def test_linear_kernel_matches_fp64_reference(n, d, B, dtype, monkeypatch):
    if KDEV == "cpu" and n * d > 4e6:
        big_blocks(monkeypatch)
    g = torch.Generator().manual_seed(n + B)
    x = torch.randn(B, d, generator=g).to(KDEV, dtype)
    w = (torch.randn(n, d, generator=g) / d ** 0.5).to(KDEV, dtype)
    y = kernel.linear(x, w)
    assert y.dtype == dtype and y.shape == (B, n)
    assert rel_err(y, kernel.linear_reference(x.double(), w.double())) < TOL[dtype]


def norm_weight(d, seed):
    """RMSNorm weights of 0.5, 1 and 2 at random: uneven enough that a missing or misplaced weight shows,
    and x * weight stays exact in bf16, as the tensor-core path (B > 1) rounds it to the weights' dtype."""
    return (2.0 ** torch.randint(-1, 2, (d,), generator=torch.Generator().manual_seed(seed))).to(KDEV)


@pytest.mark.parametrize("d,ffn,B,dtype", [(37, 53, 1, torch.float32), (37, 53, 5, torch.float16), (576, 1536, 1, torch.bfloat16),
                                           (1000, 2750, 3, torch.bfloat16), (4096, 11008, 1, torch.bfloat16)])
def test_cats_mlp_with_norm_and_residual_matches_fp64_reference(d, ffn, B, dtype, monkeypatch):
    """The decode layer's `h + mlp(RMSNorm(h))` in one call: the norm folded into the MLP kernel (or
    gate_up), the residual into reduce; each stage's output poisoned before its launch."""
    if KDEV == "cpu" and d * ffn > 4e6:
        big_blocks(monkeypatch)
    x_of, ws = mlp_weights(d, ffn, dtype, seed=d + B + 1)
    x, nw = x_of(B) * 3, norm_weight(d, d).to(dtype)  # * 3: rms far from 1, so a missing norm shows
    ref = [a.double() for a in (x, *ws, nw)]
    normed = kernel.rms_norm_reference(ref[0], ref[4], 1e-5)
    t = kernel.as_threshold(threshold_in_gap(normed, ws[0], 0.5), KDEV)
    if B == 1:
        programs = kernel.persistent_programs(kernel.mlp_config(d, ffn, sparse=True), ffn)
        part = kernel.mlp(x, *ws, t, nw, 1e-5, part=poisoned(programs, d))
    else:
        h = kernel.gate_up(x, ws[0], ws[1], t, nw, 1e-5, h=poisoned(B, ffn))
        assert rel_err(h, kernel.gate_up_reference(normed, ref[1], ref[2], t)) < TOL[dtype]
        part = kernel.down(h, ws[2], part=poisoned(kernel.down_config(B, d, ffn)["SPLITS"], B, d))
    res = x_of(B) / 4
    out = kernel.reduce(part, poisoned(B, d, dtype=dtype), residual=res)
    expected = kernel.cats_mlp_reference(ref[0], *ref[1:4], t, ref[4], 1e-5, residual=res.double())
    assert (expected - res.double()).norm() > 0.3 * res.double().norm()  # the MLP's part is not lost in the residual
    assert rel_err(out, expected) < TOL[dtype]
    torch.testing.assert_close(kernel.cats_mlp(x, *ws, t, nw, 1e-5, residual=res), out, rtol=0, atol=0)


@pytest.mark.parametrize("n,d,B,dtype", [(53, 37, 1, torch.float32), (1101, 37, 1, torch.bfloat16),
                                         (53, 37, 8, torch.bfloat16), (1000, 576, 3, torch.float16),
                                         (4096, 4096, 1, torch.bfloat16), (12288, 4096, 1, torch.float32),
                                         (32000, 4096, 1, torch.bfloat16)])
def test_linear_with_norm_and_residual_matches_fp64_reference(n, d, B, dtype, monkeypatch):
    """RMSNorm folded into the product (q/k/v, LM head) and the residual add into it (wo)."""
    if KDEV == "cpu" and n * d > 4e6:
        big_blocks(monkeypatch)
    g = torch.Generator().manual_seed(n + B + 1)
    x = (3 * torch.randn(B, d, generator=g)).to(KDEV, dtype)
    w = (torch.randn(n, d, generator=g) / d ** 0.5).to(KDEV, dtype)
    nw, res = norm_weight(d, n).to(dtype), torch.randn(B, n, generator=g).to(KDEV, dtype)
    ref = kernel.linear_reference(x.double(), w.double(), nw.double(), 1e-5)
    assert rel_err(kernel.linear_triton(x, w, nw, 1e-5, out=poisoned(B, n, dtype=dtype)), ref) < TOL[dtype]
    y = kernel.linear_triton(x, w, None, 0.0, res, out=poisoned(B, n, dtype=dtype))
    assert rel_err(y, kernel.linear_reference(x.double(), w.double(), residual=res.double())) < TOL[dtype]
    assert rel_err(kernel.linear(x, w, nw, 1e-5, res), ref + res.double()) < TOL[dtype]


ATTENTION_CASES = [  # (B, n_head, n_kv, cache length, head_dim, position, window, dtype)
    (1, 4, 2, 37, 16, 20, None, torch.float32), (2, 3, 3, 70, 8, 69, None, torch.float16),  # last slot
    (1, 4, 1, 50, 6, 45, 7, torch.float32),  # head_dim 6: halves of 3, padded lanes; window of 7
    (2, 2, 2, 10, 16, 0, None, torch.bfloat16),  # the first token sees only itself
    (1, 32, 32, 1024, 128, 271, None, torch.bfloat16),  # Llama-2-7B, 1k cache
    (1, 32, 8, 1024, 128, 700, 300, torch.bfloat16),  # Mistral-7B's heads, a window inside the cache
]


@pytest.mark.parametrize("B,n_head,n_kv,S,hd,pos,window,dtype", ATTENTION_CASES)
def test_decode_attention_matches_fp64_reference(B, n_head, n_kv, S, hd, pos, window, dtype):
    g = torch.Generator().manual_seed(S + pos)
    qkv = torch.randn(B, (n_head + 2 * n_kv) * hd, generator=g).to(KDEV, dtype)
    k_cache, v_cache = (torch.randn(B, n_kv, S, hd, generator=g).to(KDEV, dtype) for _ in range(2))
    inv_freq = (1.0 / 500.0 ** (torch.arange(0, hd, 2).float() / hd)).to(KDEV)
    input_pos = torch.tensor([pos], device=KDEV)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    ref = kernel.attention_reference(qkv.double(), k_ref, v_ref, input_pos, inv_freq.double(), n_head, window)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    c = kernel.attention_config(B, n_head, S)
    counts = torch.zeros(B * n_head, device=KDEV, dtype=torch.int32)
    y = kernel.attention(qkv, k_cache, v_cache, input_pos, inv_freq, counts, n_head, window,
                         out=(poisoned(B * n_head, c["SPLITS"]), poisoned(B * n_head, c["SPLITS"]),
                              poisoned(B * n_head, c["SPLITS"], hd), poisoned(B, n_head * hd, dtype=dtype)))
    assert not counts.any()  # the head's last program merged the slices and left its counter at zero
    assert rel_err(y, ref) < TOL[dtype]
    # the new k (after RoPE) and v land in slot pos, within a rounding of the fp64 values (TOL / 2 is
    # ~2 bf16 ulps: Triton's CPU interpreter truncates to bf16 where the GPU rounds to nearest)...
    assert rel_err(k_cache[:, :, pos], k_ref[:, :, pos]) < TOL[dtype] / 2
    torch.testing.assert_close(v_cache[:, :, pos].double(), v_ref[:, :, pos], rtol=0, atol=0)
    # ...and no other slot changes
    others = torch.arange(S, device=KDEV) != pos
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others]) and torch.equal(v_cache[:, :, others], v_before[:, :, others])
    # the public entry point gives the same on fresh caches, with its own counters and with the ones
    # used above, twice (each launch must leave them ready for the next)
    for c in (None, counts, counts):
        k_cache, v_cache = k_before.clone(), v_before.clone()
        torch.testing.assert_close(kernel.decode_attention(qkv, k_cache, v_cache, input_pos, inv_freq, n_head, window, c),
                                   y, rtol=0, atol=0)


@pytest.mark.parametrize("pos,window", [(69, None), (60, 13)])
def test_decode_attention_over_slices_of_several_tiles(pos, window, monkeypatch):
    """Long caches give each program a slice of several tiles, read one after another in the loop: here
    slices of 64 positions in tiles of 8."""
    config = kernel.attention_config
    monkeypatch.setattr(kernel, "attention_config", lambda B, n_head, S: config(B, n_head, S, block_s=8, programs=2 * B * n_head))
    assert kernel.attention_config(1, 4, 128) == dict(BLOCK_S=8, CHUNK=64, SPLITS=2, num_warps=2)
    test_decode_attention_matches_fp64_reference(1, 4, 2, 128, 16, pos, window, torch.float32)


def test_set_thresholds_gives_each_layer_its_own_tensor(model):
    """Views of one stacked tensor were copied into the compiled step's CUDA graph on every replay
    (27 copies a step on the H200, README); separate tensors are read in place."""
    n = model.args.n_layer
    t = torch.linspace(0.1, 0.2, n)
    model.set_thresholds(t)
    try:
        ptrs = {layer.feed_forward.threshold.untyped_storage().data_ptr() for layer in model.layers}
        assert len(ptrs) == n and t.untyped_storage().data_ptr() not in ptrs
        assert [layer.feed_forward.threshold.item() for layer in model.layers] == t.tolist()
        assert "threshold" not in "".join(model.state_dict())  # non-persistent: checkpoints stay weights only
    finally:
        model.set_thresholds(None)


def test_decode_sparsity_counts_what_the_decode_steps_zero(model):
    """bench.py's and generate.py's MLP sparsity (one teacher-forced forward over the decode steps'
    tokens) against the zeros counted in each cached step as it runs."""
    import bench
    from generate import generate
    model.set_thresholds(torch.full((model.args.n_layer,), 0.2), kernel="torch")
    try:
        prompt = torch.randint(0, model.args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
        zeros, total = [], []
        def count(ff, inputs):
            g = F.silu(ff.w_gate(inputs[0])).abs()
            zeros.append((g <= ff.threshold).sum().item())
            total.append(g.numel())
        hooks = [layer.feed_forward.register_forward_pre_hook(count) for layer in model.layers]
        try:
            generate(model, prompt, 8)
        finally:
            for h in hooks:
                h.remove()
        n = model.args.n_layer  # the first n calls are the prompt's prefill
        stepwise = sum(zeros[n:]) / sum(total[n:])
        assert 0.05 < stepwise < 0.95
        assert bench.decode_sparsity(model, prompt, 8) == pytest.approx(stepwise, abs=1 / sum(total[n:]))
    finally:
        model.set_thresholds(None, kernel="auto")


def test_bench_profile_refuses_a_position_outside_the_kv_cache(monkeypatch):
    """One clear line, before any model is built: the profiled position is prompt + new_tokens / 2."""
    import argparse
    import bench
    monkeypatch.setattr(bench.kernel, "USE_PDL", False)
    args = argparse.Namespace(prompt_len=16, new_tokens=256, cache=100, shapes=["llama2-7b"], ckpt=None, sparsity=[0.5])
    with pytest.raises(SystemExit, match="position 144 .* must be inside the KV cache \\(100\\)"):
        bench.bench_profile(args)


@pytest.mark.parametrize("d,ffn,config", [
    (38, 53, dict(BLOCK_N=2, programs=5, num_warps=4)),  # odd ffn: the last block half past the end
    (576, 1536, dict(BLOCK_N=4, programs=7, num_warps=4)),
    (4096, 11008, None),  # on the GPU kernel.py's own configuration: 264 programs of 2-neuron blocks
])
def test_bench_floor_reads_every_gate_row_and_only_kept_up_down_rows(d, ffn, config, monkeypatch):
    """bench.py floor's read-only kernel, against its reference (program p takes blocks p, p + P, ...,
    as mlp_kernel does). Each row's words are one bit, chosen by row and matrix, so the OR shows which
    rows a program read (bits 0-30); a dropped neuron's W_up / w_down_t rows are all ones, bit 31 included,
    which no OR of the rows that should be read gives."""
    import bench
    if config is None and KDEV == "cpu":
        config = dict(BLOCK_N=64, programs=6, num_warps=4)  # the interpreter pays per program and per step
    if config:
        monkeypatch.setattr(bench.kernel, "mlp_config", lambda D, F, sparse: config)
    one_bit = lambda m: (1 << ((3 * torch.arange(ffn) + m) % 31)).to(torch.int32)[:, None].expand(ffn, d // 2)  # noqa: E731
    w_gate, w_up, w_down_t = (one_bit(m).contiguous().view(torch.bfloat16).to(KDEV) for m in range(3))
    keep = (torch.rand(ffn, generator=torch.Generator().manual_seed(d)) < 0.5).to(KDEV, torch.int8)
    for w in (w_up, w_down_t):
        w.view(torch.int16)[~keep.bool()] = -1
    c = bench.kernel.mlp_config(d, ffn, True)
    programs = bench.kernel.persistent_programs(c, ffn)
    out = torch.full((programs, c["BLOCK_N"], d // 2), 0x5A5A5A5A, device=KDEV, dtype=torch.int32)
    bench.read_rows(keep, w_gate, w_up, w_down_t, out=out)
    assert torch.equal(out, bench.read_rows_reference(keep, w_gate, w_up, w_down_t, programs, c["BLOCK_N"]))


def test_bench_floor_refuses_odd_d():
    import bench
    w = torch.zeros(8, 37, device=KDEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous weights of even d"):
        bench.read_rows(torch.ones(8, device=KDEV, dtype=torch.int8), w, w, w)


def test_dense_threshold_none_keeps_every_neuron():
    x_of, ws = mlp_weights(64, 96, torch.float32, seed=5)
    for B in (1, 3):
        x = x_of(B)
        dense = (F.silu(x.double() @ ws[0].double().T) * (x.double() @ ws[1].double().T)) @ ws[2].double()
        assert rel_err(kernel.cats_mlp(x, *ws, None), dense) < 1e-5


def test_cats_mlp_each_token_keeps_its_own_mask():
    """B > 1: a row is read when any token needs it, but each token must still drop its own zeros."""
    x_of, (w_gate, w_up, w_down_t) = mlp_weights(64, 96, torch.float32, seed=7)
    x = x_of(4)
    t = threshold_in_gap(x, w_gate, 0.5)
    together = kernel.cats_mlp(x, w_gate, w_up, w_down_t, t)
    alone = torch.cat([kernel.cats_mlp(x[i:i + 1], w_gate, w_up, w_down_t, t) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert rel_err(together, kernel.cats_mlp_reference(*(a.double() for a in (x, w_gate, w_up, w_down_t)), t)) < 1e-5


def test_kernels_are_custom_ops_that_compile_without_graph_breaks():
    x_of, ws = mlp_weights(64, 96, torch.float32, seed=3)
    for B in (1, 2):
        x, t = x_of(B), torch.tensor(0.1, device=KDEV)
        nw = norm_weight(64, 0)
        torch.library.opcheck(torch.ops.cats.mlp.default, (x, *ws, t, None, 1e-5, None))
        torch.library.opcheck(torch.ops.cats.mlp.default, (x, *ws, t, nw, 1e-5, x))
        torch.library.opcheck(torch.ops.cats.linear.default, (x, ws[0], None, 1e-5, None))
        torch.library.opcheck(torch.ops.cats.linear.default, (x, ws[0], nw, 1e-5, x.new_ones(B, 96)))
        qkv = torch.randn(B, 6 * 16, device=KDEV)
        caches = [torch.randn(B, 2, 12, 16, device=KDEV) for _ in range(2)]
        torch.library.opcheck(torch.ops.cats.attention.default,
                              (qkv, *caches, torch.tensor([5], device=KDEV), torch.rand(8, device=KDEV),
                               torch.zeros(B * 2, device=KDEV, dtype=torch.int32), 2, 0))
        compiled = torch.compile(lambda x: kernel.cats_mlp(x, *ws, t) * 2 + kernel.linear(x, ws[1]).sum(), fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(x), kernel.cats_mlp(x, *ws, t) * 2 + kernel.linear(x, ws[1]).sum())


def test_kernels_reject_bad_shapes():
    x_of, ws = mlp_weights(32, 48, torch.float32, seed=1)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        kernel.cats_mlp(x_of(9), *ws, 0.1)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        kernel.linear(x_of(9), ws[0])
    with pytest.raises(ValueError, match="must be"):
        kernel.cats_mlp(x_of(1), ws[0], ws[1][:, :16].contiguous(), ws[2], 0.1)
    with pytest.raises(ValueError, match="norm weight must be"):
        kernel.linear(x_of(1), ws[0], torch.ones(31, device=KDEV))
    with pytest.raises(ValueError, match="residual must be"):
        kernel.linear(x_of(2), ws[0], residual=x_of(2))
    cache = torch.zeros(1, 2, 12, 16, device=KDEV)
    with pytest.raises(ValueError, match="qkv must be"):
        kernel.decode_attention(torch.zeros(1, 5 * 16, device=KDEV), cache, cache.clone(), torch.tensor([3], device=KDEV),
                                torch.ones(8, device=KDEV), 2)
    with pytest.raises(ValueError, match="counts must be int32"):
        kernel.decode_attention(torch.zeros(1, 6 * 16, device=KDEV), cache, cache.clone(), torch.tensor([3], device=KDEV),
                                torch.ones(8, device=KDEV), 2, counts=torch.zeros(2, device=KDEV))


@pytest.mark.parametrize("batch", [1, 2])
def test_model_decode_through_kernels_matches_torch_path_in_fp32(model, batch, monkeypatch):
    """With kernel "triton", one-token decode steps go through kernel.linear and kernel.cats_mlp (here in
    the interpreter), dense and with CATS; in fp32 they must give the plain PyTorch path's logits (in
    bf16 CATS may not: see README)."""
    if KDEV == "cuda":  # the kernels run on CUDA tensors there; the shared fixture stays on the CPU
        model = copy.deepcopy(model).to(KDEV)
    torch.manual_seed(0)
    idx = torch.randint(0, model.args.vocab_size, (batch, 10), device=KDEV)
    with torch.no_grad():
        gates = [F.silu(model.layers[i].feed_forward.w_gate(model.tok_embeddings(idx))).abs().flatten()
                 for i in range(model.args.n_layer)]
    if KDEV == "cpu":
        big_blocks(monkeypatch)
    calls = []
    for name in ("cats_mlp_triton", "linear_triton"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    try:
        for thresholds in (None, torch.stack([g.median() for g in gates]).cpu()):
            logits = {}
            for path in ("torch", "triton"):
                model.set_thresholds(thresholds, kernel=path)
                model.setup_caches(batch, 10)
                calls.clear()
                with torch.no_grad():
                    steps = [model(idx[:, :4], torch.arange(4, device=KDEV))] + [model(idx[:, t:t + 1], torch.tensor([t], device=KDEV)) for t in range(4, 10)]
                logits[path] = torch.cat(steps, dim=1)
                n = model.args.n_layer * 6  # decode steps x layers: one MLP and two projections each
                assert calls.count("cats_mlp_triton") == (n if path == "triton" else 0)
                assert calls.count("linear_triton") == (n * 2 + 6 if path == "triton" else 0)
            torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    finally:
        model.set_thresholds(None, kernel="auto")


# ---------------------------------------------------------------------------------------------------
# finetune.py: LoRA, CATS in the training loop, the ReLU baseline, the checkpoint it writes

def fresh(tiny) -> Transformer:
    """A model of its own: these tests add adapters and change weights, so never the shared `model`."""
    return Transformer.from_pretrained(tiny[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_thresholds(tiny, model, tmp_path_factory):
    """A threshold file for the tiny model at 0.5 and 0.7, made in-process the way calibrate.py makes it."""
    path = tmp_path_factory.mktemp("thr") / "thr.safetensors"
    hist = calibrate.gate_histograms(model, calib_windows(tiny))
    save_thresholds(path, {s: thresholds_from_histogram(hist, s)[0] for s in (0.5, 0.7)},
                    {**model_signature(model), "mode": "dense", "tokens": CALIB_TOKENS, "seq_len": SEQ_LEN})
    return path


@pytest.mark.parametrize("targets", [["q", "v", "gate", "up", "down"], list(finetune.LORA_TARGETS)])
@torch.no_grad()
def test_lora_merge_gives_the_same_logits(tiny, targets):
    m = fresh(tiny)
    idx = calib_windows(tiny)[:2, :64]
    base, before = m(idx), {k: v.clone() for k, v in m.state_dict().items()}
    params = finetune.add_lora(m, targets, rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for p in params:  # B starts at zero; random B and A make every adapter count
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapted = m(idx)
    finetune.merge_lora(m)
    merged = m(idx)
    assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in m.modules())
    assert m.state_dict().keys() == before.keys()  # a plain model again
    assert (adapted - base).abs().max() > 0.1  # the adapters change the output...
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)  # ...and merging keeps that change

    # Each adapter landed on its own weight rows, with the HF LoRA convention (A: input side, B: output side).
    a = m.args
    q, kv, s = a.n_head * a.head_dim, a.n_kv_head * a.head_dim, 8 / 4
    ad = dict(zip(targets, zip(params[0::2], params[1::2])))  # layer 0's adapters, in target order
    w0, w = before["layers.0.attention.wqkv.weight"], m.layers[0].attention.wqkv.weight
    for name, rows in [("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))]:
        delta = s * ad[name][1] @ ad[name][0] if name in ad else 0
        torch.testing.assert_close(w[rows], w0[rows] + delta)
    da, db = ad["down"]  # down_proj is [d, ffn] in HF; we keep its transpose
    assert da.shape == (4, a.intermediate_size) and db.shape == (a.dim, 4)
    torch.testing.assert_close(m.layers[0].feed_forward.w_down_t,
                               before["layers.0.feed_forward.w_down_t"] + (s * db @ da).T)


def test_cats_gradient_is_zero_exactly_where_the_mask_is(tiny, tiny_thresholds):
    m = fresh(tiny)
    t = load_thresholds(tiny_thresholds, 0.5, model_signature(m))
    m.set_thresholds(t, kernel="torch")
    m.requires_grad_(False)
    finetune.add_lora(m, ["gate", "up", "down"], rank=4, alpha=8)
    seen = []  # per layer: gate pre-activation z and up-projection u, with their gradients kept

    def keep(mod, inp, out):
        out.retain_grad()
        seen.append(out)

    hooks = [h for layer in m.layers for h in (layer.feed_forward.w_gate.register_forward_hook(keep),
                                               layer.feed_forward.w_up.register_forward_hook(keep))]
    idx = calib_windows(tiny)[:2]
    try:
        finetune.next_token_loss(m, idx, bf16=False).backward()
    finally:
        for h in hooks:
            h.remove()
    for i in range(m.args.n_layer):
        z, u = seen[2 * i], seen[2 * i + 1]
        # The last position predicts nothing and no later position sees it: it gets no gradient at all.
        assert not z.grad[:, -1].any() and not u.grad[:, -1].any()
        kept = F.silu(z.detach()[:, :-1]).abs() > t[i]  # CATS' mask
        assert 0.3 < kept.double().mean() < 0.7
        # h = CATS(SiLU(z)) * u: a zeroed neuron passes no gradient to z nor to u; a kept one passes some
        assert torch.equal(z.grad[:, :-1] != 0, kept) and torch.equal(u.grad[:, :-1] != 0, kept)


def test_finetune_cats_end_to_end(tiny, tiny_thresholds, tmp_path, capsys):
    ckpt, text = tiny
    data = tmp_path / "train.txt.gz"
    data.write_bytes(gzip.compress(text.read_bytes()))
    out, log = tmp_path / "out", tmp_path / "curve.csv"
    finetune.main(["--ckpt", str(ckpt), "--thresholds", str(tiny_thresholds), "--sparsity", "0.5",
                   "--data", str(data), "--eval", str(text), "--eval-tokens", "1024", "--seq-len", "128",
                   "--batch-tokens", "512", "--steps", "12", "--lr", "3e-3", "--lora-rank", "8",
                   "--eval-every", "6", "--log-every", "3", "--device", "cpu", "--log", str(log), "--out", str(out)])
    printed = capsys.readouterr()
    assert "step 12/12" in printed.out and "text ppl" in printed.out  # progress, with held-out perplexity

    rows = finetune.read_curve(log)
    assert [r["step"] for r in rows] == ["0", "3", "6", "9", "12"]
    assert rows[-1]["tokens"] == str(12 * 512)
    evaluated = [r for r in rows if r["ppl_text"]]
    assert [r["step"] for r in evaluated] == ["0", "6", "12"]
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])  # training reduces the loss
    assert float(evaluated[-1]["ppl_text"]) < 0.9 * float(evaluated[0]["ppl_text"])
    assert all(0.3 < float(r["sparsity_text"]) < 0.7 for r in evaluated)  # CATS was on throughout

    # The checkpoint: complete, nothing left beside it, loadable, and the model that was trained.
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "curve.png")  # the PNG: when matplotlib is installed
    assert left == ["curve.csv", "out", "train.txt.gz"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "cats_thresholds.safetensors",
            "finetune.csv", "finetune.json"} <= {p.name for p in out.iterdir()}
    trained = Transformer.from_pretrained(out)
    assert trained.tok_embeddings.weight.dtype == torch.float32
    sig = model_signature(trained)
    assert sig["fingerprint"] != model_signature(fresh(tiny))["fingerprint"]
    t = load_thresholds(out / "cats_thresholds.safetensors", 0.5, sig)  # re-signed for the new weights
    assert torch.equal(t, load_thresholds(tiny_thresholds, 0.5, model_signature(fresh(tiny))))  # unchanged
    _, meta = read_threshold_file(out / "cats_thresholds.safetensors")
    assert meta["mode"] == "dense" and meta["tokens"] == str(CALIB_TOKENS)  # the calibration's metadata kept
    assert json.loads(meta["carried_over"])["from_fingerprint"] == model_signature(fresh(tiny))["fingerprint"]
    assert available_sparsities(out / "cats_thresholds.safetensors") == [0.5]  # only the level it trained with
    trained.set_thresholds(t, kernel="torch")
    windows = calibrate.token_windows(load_tokenizer(out), [text], 1024, 128)
    ppl, _ = finetune.evaluate(trained, windows, 4, bf16=False, relu=False)
    assert f"{ppl:.4f}" == evaluated[-1]["ppl_text"]

    r = run_generate("--ckpt", out, "--sparsity", "0.5", "--prompt", "ab cd", "--max-new-tokens", 4,
                     "--device", "cpu", "--temperature", 0)
    assert r.returncode == 0, r.stderr[-2000:]

    shutil.copy(log, tmp_path / "other.csv")
    finetune.compare([log, tmp_path / "other.csv"], tmp_path / "both.png")
    table = capsys.readouterr().out
    assert "| tokens | curve | other |" in table and f"| 6,144 | {float(evaluated[-1]['ppl_text']):.3f} (" in table


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trips(tmp_path, tied):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf(src, "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied))
    m = Transformer.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # not the file's weights any more, so a copied file would not pass
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_pretrained(m, out, read_config(src))
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and ("lm_head.weight" in b.keys()) != tied
    back = Transformer.from_pretrained(out)
    assert back.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())
    idx = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m(idx)
        torch.testing.assert_close(back(idx), ours, rtol=0, atol=0)
        assert_close(load_hf(out)(idx).logits, ours)  # transformers reads it as the same model


def test_relu_baseline_matches_transformers_and_exports(tiny, tmp_path):
    need_transformers()
    ckpt, text = tiny
    m = fresh(tiny)
    finetune.use_relu(m)
    idx = calib_windows(tiny)[:2, :64]
    relu_hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, hidden_act="relu",
                                                                attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(m(idx), relu_hf(idx).logits)

    out = tmp_path / "out"
    finetune.main(["--ckpt", str(ckpt), "--activation", "relu", "--data", str(text), "--seq-len", "128",
                   "--batch-tokens", "256", "--steps", "2", "--lr", "1e-2", "--lora-rank", "4", "--device", "cpu",
                   "--eval", str(text), "--eval-tokens", "256", "--log", str(tmp_path / "relu.csv"), "--out", str(out)])
    assert read_config(out)["hidden_act"] == "relu" and not (out / "cats_thresholds.safetensors").exists()
    check_error(lambda: Transformer.from_pretrained(out), "hidden_act")  # model.py: CATS needs a SiLU MLP
    rows = finetune.read_curve(tmp_path / "relu.csv")
    assert float(rows[0]["sparsity_text"]) > 0.3  # ReLU's own zeros are counted
    # Read as SiLU by our loader, given ReLU back: the same function as transformers reading the export.
    silu = tmp_path / "silu"
    shutil.copytree(out, silu)
    edit_config(silu, hidden_act="silu")
    trained = Transformer.from_pretrained(silu)
    finetune.use_relu(trained)
    with torch.no_grad():
        assert_close(trained(idx), load_hf(out)(idx).logits)
        assert (trained(idx) - m(idx)).abs().max() > 1e-3  # and it did train


def test_full_finetuning_trains_every_weight_and_leaves_the_source_alone(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny[0], src)
    before = (src / "model.safetensors").read_bytes()  # loading may memory-map it: training must not write it
    finetune.main(["--ckpt", str(src), "--full", "--data", str(tiny[1]), "--seq-len", "128", "--batch-tokens", "256",
                   "--steps", "2", "--lr", "1e-3", "--device", "cpu", "--log", str(tmp_path / "full.csv"),
                   "--out", str(tmp_path / "out")])
    assert (src / "model.safetensors").read_bytes() == before
    base, trained = fresh(tiny).state_dict(), Transformer.from_pretrained(tmp_path / "out").state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in base.items())  # norms and embeddings too


def test_token_windows_read_gz_as_plain_text(tiny, tmp_path):
    tok = load_tokenizer(tiny[0])
    gz = tmp_path / "text.txt.gz"
    gz.write_bytes(gzip.compress(tiny[1].read_bytes()))
    for n in (None, 2048):
        assert torch.equal(calibrate.token_windows(tok, [gz], n, SEQ_LEN), calibrate.token_windows(tok, [tiny[1]], n, SEQ_LEN))


def test_interrupted_checkpoint_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    args = finetune.parse_args(["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "out")])

    def crash_half_way(model, folder, config):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(finetune, "save_pretrained", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        finetune.write_checkpoint(fresh(tiny), args, None, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["sparsity-1", "no-threshold-file", "level-not-in-file", "relu-with-sparsity",
                                  "missing-data", "missing-ckpt", "out-exists", "batch-not-multiple", "bad-target"])
def test_finetune_bad_input_fails_cleanly(tiny, tiny_thresholds, tmp_path, capsys, case):
    ckpt, data = tiny
    (tmp_path / "taken").mkdir()
    log = tmp_path / "log.csv"
    base = ["--ckpt", str(ckpt), "--data", str(data), "--seq-len", "128", "--batch-tokens", "256", "--steps", "2",
            "--device", "cpu", "--log", str(log)]
    thr = ["--thresholds", str(tiny_thresholds)]
    argv, says = {
        "sparsity-1": (base + thr + ["--sparsity", "1"], "--sparsity must be in [0, 1)"),
        "no-threshold-file": (base + ["--sparsity", "0.5"], "no threshold file"),
        "level-not-in-file": (base + thr + ["--sparsity", "0.6"], "holds thresholds for sparsity 0.5, 0.7, not 0.6"),
        "relu-with-sparsity": (base + thr + ["--sparsity", "0.5", "--activation", "relu"], "drop --sparsity"),
        "missing-data": (base[:3] + [str(tmp_path / "nope.txt")] + base[4:], "nope.txt does not exist"),
        "missing-ckpt": (["--ckpt", str(tmp_path / "nockpt")] + base[2:], "does not exist"),
        "out-exists": (base + ["--out", str(tmp_path / "taken")], "already exists"),
        "batch-not-multiple": (base + ["--batch-tokens", "300"], "multiple of --seq-len"),
        "bad-target": (base + ["--lora-targets", "q,gates"], "--lora-targets"),
    }[case]
    fails_with_one_line(finetune.main, argv, says, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and not any((tmp_path / "taken").iterdir())


# ---------------------------------------------------------------------------------------------------
# More bad input: files that parse but are wrong, bad flags, paths that cannot be written, Ctrl-C

def without(d: Path, field: str):
    cfg = json.loads((d / "config.json").read_text())
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,says", [
    ("list", "holds a JSON list"), ("no-hidden-size", "has no hidden_size"), ("layers-str", "num_hidden_layers is '2'"),
    ("zero-heads", "num_attention_heads is 0"), ("llama3-rope-partial", "low_freq_factor"),
    ("kv-groups", "4 attention heads, 3 key/value heads"), ("odd-head-dim", "head size 15 do not fit"),
    ("rope-not-dict", "rope_scaling is 'yes', not an object")])
def test_config_that_parses_but_is_wrong(good_ckpt, tmp_path, case, says):
    d = broken_copy(good_ckpt, tmp_path)
    if case == "list":
        (d / "config.json").write_text("[]")
    elif case == "no-hidden-size":
        without(d, "hidden_size")
    elif case == "layers-str":
        edit_config(d, num_hidden_layers="2")
    elif case == "zero-heads":
        edit_config(d, num_attention_heads=0)
    elif case == "kv-groups":
        edit_config(d, num_key_value_heads=3)
    elif case == "odd-head-dim":
        edit_config(d, head_dim=15)
    elif case == "rope-not-dict":
        edit_config(d, rope_scaling="yes", rope_parameters=None)
    else:  # llama3 scaling needs low_freq_factor and high_freq_factor too
        edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}, rope_scaling=None)
    check_error(lambda: Transformer.from_pretrained(d), str(d / "config.json"), says)


@pytest.mark.parametrize("name,text", [("tokenizer.json", "{not json"), ("tokenizer.json", "{}"),
                                       ("tokenizer.model", "not a sentencepiece model")])
def test_corrupt_tokenizer(tmp_path, name, text):
    pytest.importorskip("tokenizers" if name.endswith(".json") else "sentencepiece")
    write_config(tmp_path)
    (tmp_path / name).write_text(text)
    check_error(lambda: load_tokenizer(tmp_path), str(tmp_path / name), "re-download")


@pytest.mark.parametrize("text", ["{}", "{not json", '{"weight_map": []}'])
def test_corrupt_shard_index(good_ckpt, tmp_path, text):
    d = broken_copy(good_ckpt, tmp_path, "sharded")
    (d / "model.safetensors.index.json").write_text(text)
    check_error(lambda: Transformer.from_pretrained(d), "model.safetensors.index.json", "corrupt")


def test_checkpoint_path_that_is_a_file(good_ckpt, tmp_path):
    d = broken_copy(good_ckpt, tmp_path)
    check_error(lambda: Transformer.from_pretrained(d / "config.json"), "is a file, not a checkpoint folder", str(d))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, "int32"])
def test_threshold_file_with_unusable_values(tmp_path, value):
    from safetensors.torch import save_file
    path = tmp_path / "thr.safetensors"
    if value == "int32":  # save_thresholds always writes float32: write the file by hand
        save_file({"sparsity_0.5": torch.zeros(3, dtype=torch.int32)}, str(path), metadata={"format": "cats-thresholds/1"})
    else:
        save_thresholds(path, {0.5: torch.tensor([0.1, value, 0.2])}, {"n_layer": 3})
    with pytest.raises(ThresholdError) as e:
        read_threshold_file(path)
    assert f"{path} is damaged: sparsity_0.5" in str(e.value)


@pytest.mark.parametrize("argv,says", [
    (["--top-k", "-5"], "--top-k must be >= 1"), (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--thresholds", "nope.safetensors"], "pass --sparsity too"),
    (["--device", "gpu"], "--device gpu is not available here; use cpu or cuda"),
    (["--device", "mps"], "--device mps is not available here; use cpu or cuda"),
    (["--device", "meta"], "--device meta is not available here")])
def test_generate_bad_flags_fail_before_loading(cli_ckpt, capsys, monkeypatch, argv, says):
    import generate
    monkeypatch.setattr(generate.Transformer, "from_pretrained", None)  # reaching it would be a TypeError
    fails_with_one_line(generate.main, ["--ckpt", str(cli_ckpt)] + argv, says, capsys)


def test_generate_empty_prompt(cli_ckpt, tmp_path, capsys):
    import generate
    d = tmp_path / "ckpt"
    shutil.copytree(cli_ckpt, d)  # the same vocabulary, but a tokenizer that starts texts with nothing
    bpe_tokenizer(random_text(4500, seed=6), bos_rule=False).save(str(d / "tokenizer.json"))
    fails_with_one_line(generate.main, ["--ckpt", str(d), "--prompt", "", "--device", "cpu"], "--prompt is empty", capsys)


@pytest.mark.parametrize("case", ["out-under-a-file", "eval-too-short", "device-gpu"])
def test_calibrate_fails_before_writing(tiny, tmp_path, capsys, case):
    ckpt, data = tiny
    (tmp_path / "afile").write_text("")
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    out = tmp_path / "thr.safetensors"
    base = ["--ckpt", str(ckpt), "--data", str(data), "--tokens", "256", "--seq-len", "128", "--sparsity", "0.5"]
    argv, says = {
        "out-under-a-file": (base + ["--out", str(tmp_path / "afile" / "thr.safetensors")], "afile is a file"),
        "eval-too-short": (base + ["--out", str(out), "--eval", str(short)], "less than one 128-token window"),
        "device-gpu": (base + ["--out", str(out), "--device", "gpu"], "--device gpu is not available here"),
    }[case]
    fails_with_one_line(calibrate.main, argv, says, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "short.txt"]


@pytest.mark.parametrize("case", ["out-under-a-file", "log-under-a-file", "log-is-a-folder", "device-gpu"])
def test_finetune_fails_before_training(tiny, tmp_path, capsys, case):
    ckpt, data = tiny
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    log = tmp_path / "logs" / "log.csv"
    base = ["--ckpt", str(ckpt), "--data", str(data), "--seq-len", "128", "--batch-tokens", "256", "--steps", "1",
            "--lora-rank", "4"]
    argv, says = {
        "out-under-a-file": (base + ["--log", str(log), "--out", str(tmp_path / "afile" / "out")], "afile is a file"),
        "log-under-a-file": (base + ["--log", str(tmp_path / "afile" / "log.csv")], "afile is a file"),
        "log-is-a-folder": (base + ["--log", str(tmp_path / "adir")], "adir is a folder"),
        "device-gpu": (base + ["--log", str(log), "--device", "gpu"], "--device gpu is not available here"),
    }[case]
    fails_with_one_line(finetune.main, argv, says, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not any((tmp_path / "adir").iterdir())


def test_bench_bad_input_fails_before_the_gpu_check(good_ckpt, tmp_path):
    import bench
    (tmp_path / "bad.json").write_text("{\n")
    (tmp_path / "v3.json").write_text(json.dumps({"llama2-7b B=1": {"gate_config": dict(BLOCK_N=16, BLOCK_K=256, num_warps=4)}}))
    (tmp_path / "afile").write_text("")
    for argv, says in [
        (["mlp", "--sparsity", "0.5", "1.5"], "--sparsity must be in \\[0, 1\\), got 1.5"),
        (["mlp", "--config", str(tmp_path / "nope.json")], "cannot read --config .*nope.json"),
        (["mlp", "--config", str(tmp_path / "bad.json")], "cannot read --config .*bad.json"),
        (["mlp", "--config", str(tmp_path / "v3.json")], "gate_config is .*not a configuration of this kernel.py"),
        (["sweep", "--config-out", str(tmp_path / "afile" / "best.json")], "cannot write --config-out"),
        (["decode", "--ckpt", str(tmp_path / "nockpt")], "nockpt does not exist"),
        (["decode", "--ckpt", str(good_ckpt / "single" / "config.json")], "is a file, not a checkpoint folder"),
    ]:
        with pytest.raises(SystemExit, match=f"^error: .*{says}"):
            bench.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bad.json", "v3.json"]


def test_calibrate_ctrl_c_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(calibrate, "sequential_thresholds", interrupted)
    argv = ["--ckpt", str(tiny[0]), "--data", str(tiny[1]), "--tokens", "256", "--seq-len", "128", "--sparsity", "0.5",
            "--out", str(tmp_path / "thr.safetensors")]
    try:
        calibrate.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left calibrate.main as a KeyboardInterrupt: a traceback on the command line")
    except SystemExit as e:
        assert e.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted") and not any(l.startswith(("error", "Traceback")) for l in err)
    assert list(tmp_path.iterdir()) == []


def test_generate_ctrl_c_is_one_line(cli_ckpt):
    # Ctrl-C once the model is loaded, through the script's own entry point (its `if __name__ == "__main__"`)
    code = textwrap.dedent(f"""
        import runpy, sys, model
        def interrupt(*args):
            raise KeyboardInterrupt
        model.Transformer.setup_caches = interrupt
        sys.argv = ["generate.py", "--ckpt", {str(cli_ckpt)!r}, "--device", "cpu", "--prompt", "ab cd"]
        runpy.run_path("generate.py", run_name="__main__")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 130 and r.stderr.strip().splitlines()[-1] == "interrupted", r.stderr[-2000:]
    assert "Traceback" not in r.stderr
