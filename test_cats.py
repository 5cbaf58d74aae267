"""The test suite: `pytest test_cats.py`.

Sections, in the order the code was built: the model against `transformers` (the oracle), CATS and
calibration, the Triton kernels against their PyTorch references. Without a GPU the kernels run in
Triton's CPU interpreter; tests that need ../shared (data, the real SmolLM2 checkpoint) skip with a
reason when it is absent.
"""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernel.py is imported: Triton reads it then

import calibrate  # noqa: E402
from cats import (ThresholdError, abs_histogram, available_sparsities, cats_activation,  # noqa: E402
                  default_threshold_path, load_thresholds, model_signature, read_threshold_file,
                  save_thresholds, thresholds_from_histogram)
from model import Transformer, load_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# cats.py and calibrate.py

REPO = Path(__file__).resolve().parent
SEQ_LEN, CALIB_TOKENS = 128, 2048


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
                        "--sparsity", *map(str, levels), "--out", str(out),
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
    with pytest.raises(SystemExit) as e:
        calibrate.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1], err
    assert all(not l.startswith(("error", "Traceback")) for l in err[:-1])
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
# kernel.py: every Triton kernel against its plain-PyTorch reference in fp64. On a machine without a
# GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set at the top of this file before
# kernel.py is imported); on a GPU they run for real.

import kernel  # noqa: E402  (after TRITON_INTERPRET is set)

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


KERNEL_CASES = [  # (d, ffn, B, dtype): odd sizes, SmolLM2's, a 7B shape; every dtype; 1 to 8 tokens
    (37, 53, 1, torch.float32), (37, 53, 8, torch.bfloat16), (37, 53, 5, torch.float16),
    (1000, 2750, 3, torch.bfloat16), (1000, 2750, 1, torch.float32), (1000, 2750, 8, torch.float16),
    (576, 1536, 2, torch.bfloat16), (576, 1536, 7, torch.float32),
    (4096, 11008, 1, torch.bfloat16),
]


@pytest.mark.parametrize("d,ffn,B,dtype", KERNEL_CASES)
def test_cats_mlp_kernels_match_fp64_reference(d, ffn, B, dtype, monkeypatch):
    if KDEV == "cpu" and d * ffn > 4e6:
        # The interpreter pays per program, not per byte: the same code with fewer, larger blocks.
        monkeypatch.setattr(kernel, "gate_up_config", lambda *_: dict(BLOCK_B=16, BLOCK_N=512, BLOCK_K=1024, num_warps=4, num_stages=3))
        monkeypatch.setattr(kernel, "down_config", lambda *_: dict(BLOCK_B=16, BLOCK_D=1024, BLOCK_J=512, ROWS_PER_PROG=2048, SPLITS=6, num_warps=4, num_stages=3))
    x_of, (w_gate, w_up, w_down_t) = mlp_weights(d, ffn, dtype, seed=d + B)
    x = x_of(B)
    ref_args = [a.double() for a in (x, w_gate, w_up, w_down_t)]
    # 0% and 100% active on the small shapes; the larger ones (slow in the interpreter) at ~50%
    for active in (0.5, 0.0, 1.0, 0.1) if d * ffn < 1e5 or KDEV == "cuda" else (0.5,):
        t = kernel.as_threshold(threshold_in_gap(x, w_gate, active), KDEV)
        # each stage on its own, its output poisoned with NaN before the launch
        h = kernel.gate_up(x, w_gate, w_up, t, h=torch.full((B, ffn), float("nan"), device=KDEV))
        h_ref = kernel.gate_up_reference(ref_args[0], ref_args[1], ref_args[2], t)
        if active > 0:
            assert rel_err(h, h_ref) < TOL[dtype]
        else:
            assert not torch.isnan(h).any() and (h == 0).all()
        c = kernel.down_config(B, d, ffn)
        part = kernel.down(h, w_down_t, part=torch.full((c["SPLITS"], B, d), float("nan"), device=KDEV))
        if active > 0:
            assert rel_err(part.sum(0), kernel.down_reference(h_ref, ref_args[3])) < TOL[dtype]
        out = kernel.sum_partials(part, torch.full((B, d), float("nan"), device=KDEV, dtype=dtype))
        assert out.dtype == dtype and out.shape == (B, d)
        if active > 0:
            assert rel_err(out, kernel.cats_mlp_reference(*ref_args, t)) < TOL[dtype], active
        else:
            assert (out == 0).all()  # nothing active: nothing read, exact zeros
    # and the public entry point (custom op) on the last threshold
    torch.testing.assert_close(kernel.cats_mlp(x, w_gate, w_up, w_down_t, t), out, rtol=0, atol=0)


def test_cats_mlp_each_token_keeps_its_own_mask():
    """B > 1: a row is read when any token needs it, but each token must still drop its own zeros."""
    x_of, (w_gate, w_up, w_down_t) = mlp_weights(64, 96, torch.float32, seed=7)
    x = x_of(4)
    t = threshold_in_gap(x, w_gate, 0.5)
    together = kernel.cats_mlp(x, w_gate, w_up, w_down_t, t)
    alone = torch.cat([kernel.cats_mlp(x[i:i + 1], w_gate, w_up, w_down_t, t) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert rel_err(together, kernel.cats_mlp_reference(*(a.double() for a in (x, w_gate, w_up, w_down_t)), t)) < 1e-5


def test_cats_mlp_is_a_custom_op_that_compiles_without_graph_breaks():
    x_of, ws = mlp_weights(64, 96, torch.float32, seed=3)
    x, t = x_of(2), torch.tensor(0.1, device=KDEV)
    torch.library.opcheck(torch.ops.cats.mlp.default, (x, *ws, t))
    compiled = torch.compile(lambda x: kernel.cats_mlp(x, *ws, t) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), kernel.cats_mlp(x, *ws, t) * 2)


def test_cats_mlp_rejects_more_than_eight_tokens():
    x_of, ws = mlp_weights(32, 48, torch.float32, seed=1)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        kernel.cats_mlp(x_of(9), *ws, 0.1)
