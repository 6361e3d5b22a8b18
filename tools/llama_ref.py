#!/usr/bin/env python3
"""An independent reference of Hugging Face's LlamaForCausalLM forward pass, in numpy (float64).

It writes the fixture the Rust forward-pass test compares against:

    tests/fixtures/llama_ref/config.json         HF Llama config (model_type "llama")
    tests/fixtures/llama_ref/model.safetensors   seeded random weights, f32, HF weight names
    tests/fixtures/llama_ref/tokens.json         the input ids, a JSON list of ints
    tests/fixtures/llama_ref/logits.safetensors  "logits": f32 [T, V], the float64 forward, cast

    python3 tools/llama_ref.py                   # regenerate (numpy only)
    python3 tools/llama_ref.py --check-hf        # and prove it equals transformers' LlamaForCausalLM
                                                 # (needs torch + transformers: `make compat-env`)

The maths, written from the Llama architecture as transformers implements it:
    x = embed[ids]
    per layer:  x = x + o( attn( rope(q(n1(x))), rope(k(n1(x))), v(n1(x)) ) )
                x = x + down( silu(gate(n2(x))) * up(n2(x)) )
    logits = lm_head( norm(x) )
with RMSNorm n(x) = w * x / sqrt(mean(x^2) + eps), "rotate_half" RoPE (the two halves of each head
are the pairs, not interleaved), causal softmax attention scaled by 1/sqrt(head_dim), grouped-query
attention when num_key_value_heads < num_attention_heads (query head h reads kv head
h // (heads / kv_heads)), no biases, lm_head not tied to the embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama_ref")


# ---------------------------------------------------------------------------------------------
# safetensors without the safetensors package (the format: u64 LE header size, JSON header, data)

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "U32": np.uint32}


def save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dtype = {v: k for k, v in _DTYPES.items()}[a.dtype.type]
        data = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        s, e = meta["data_offsets"]
        out[name] = np.frombuffer(raw[base + s : base + e], dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the model


def make_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def make_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded random f32 weights, large enough that attention and logits are far from uniform."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + rng.standard_normal(d) * 0.2).astype(np.float32)

    w = {"model.embed_tokens.weight": normal((v, d), 0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal((nh * hd, d), 0.15)
        w[p + "self_attn.k_proj.weight"] = normal((nkv * hd, d), 0.15)
        w[p + "self_attn.v_proj.weight"] = normal((nkv * hd, d), 0.1)
        w[p + "self_attn.o_proj.weight"] = normal((d, nh * hd), 0.1)
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        w[p + "mlp.gate_proj.weight"] = normal((f, d), 0.1)
        w[p + "mlp.up_proj.weight"] = normal((f, d), 0.1)
        w[p + "mlp.down_proj.weight"] = normal((d, f), 0.1)
    w["model.norm.weight"] = norm_weight()
    w["lm_head.weight"] = normal((v, d), 0.15)
    return w


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    return np.cos(emb), np.sin(emb)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x: [heads, T, hd]; cos/sin: [T, hd]
    return x * cos[None] + rotate_half(x) * sin[None]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def forward(cfg: dict, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits [T, V] in float64 for one sequence starting at position 0."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    t = len(ids)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps = cfg["rms_norm_eps"]
    group = nh // nkv
    cos, sin = rope_cos_sin(np.arange(t), hd, cfg["rope_theta"])
    mask = np.triu(np.full((t, t), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][np.asarray(ids)]  # [T, D]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = np.repeat(k, group, axis=0)  # kv head j serves query heads j*group .. j*group+group-1
        v = np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask[None]
        attn = softmax(scores) @ v  # [nh, T, hd]
        x = x + attn.transpose(1, 0, 2).reshape(t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------


def check_hf(out_dir: str, ids: list[int], logits: np.ndarray) -> float:
    """Load the fixture with transformers' LlamaForCausalLM and compare its logits with ours."""
    import torch
    from transformers import LlamaForCausalLM

    # Even in float64, transformers computes RMSNorm and the RoPE cos/sin in float32, so the
    # float64 model agrees to float32 rounding (~1e-6), not to float64's.
    worst = 0.0
    for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        model = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=dtype, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits[0].to(torch.float64).numpy()
        diff = float(np.max(np.abs(hf - logits)))
        print(f"transformers LlamaForCausalLM ({str(dtype).replace('torch.', '')}) vs numpy reference: "
              f"max abs diff {diff:.3e} (logits std {logits.std():.3f}, tolerance {tol:g})")
        if not diff <= tol:
            sys.exit(f"llama_ref: transformers disagrees with the numpy reference by {diff:.3e} > {tol:g}")
        worst = max(worst, diff)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=20240815)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=176)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4, help="< heads for grouped-query attention")
    ap.add_argument("--vocab", type=int, default=323)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--check-hf", action="store_true", help="compare with transformers (needs torch)")
    args = ap.parse_args()
    if args.heads % args.kv_heads or args.hidden % args.heads:
        sys.exit("llama_ref: heads must divide hidden and kv-heads must divide heads")

    os.makedirs(args.out, exist_ok=True)
    cfg = make_config(args)
    weights = make_weights(cfg, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    ids = [cfg["bos_token_id"]] + [int(i) for i in rng.integers(3, args.vocab, size=args.tokens - 1)]
    logits = forward(cfg, weights, ids)

    write_json(os.path.join(args.out, "config.json"), cfg)
    save_safetensors(os.path.join(args.out, "model.safetensors"), weights)
    write_json(os.path.join(args.out, "tokens.json"), ids)
    save_safetensors(os.path.join(args.out, "logits.safetensors"), {"logits": logits.astype(np.float32)})
    # Round trip through our own reader: the files hold exactly what the maths used.
    again = forward(cfg, load_safetensors(os.path.join(args.out, "model.safetensors")), ids)
    assert np.array_equal(again, logits)
    top = np.argmax(logits, axis=-1)
    print(f"llama_ref: wrote {args.out}: {len(weights)} tensors, "
          f"{sum(a.size for a in weights.values())} parameters, {len(ids)} tokens, logits {list(logits.shape)} "
          f"(std {logits.std():.3f}, {len(set(top.tolist()))} distinct argmax tokens)")
    if args.check_hf:
        check_hf(args.out, ids, logits)


if __name__ == "__main__":
    main()
