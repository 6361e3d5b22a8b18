#!/usr/bin/env python3
"""Reference dumps for the training engine's gradient and optimizer tests, made with the real
thing: transformers' LlamaForCausalLM, `loss.backward()` and `torch.optim.AdamW`.

    .venv-torch/bin/python tools/engine_ref.py     # `make compat-env` first; writes
                                                   # tests/fixtures/engine_ref/ (a few hundred KB)

Files:
    config.json         a small HF Llama config with grouped-query attention (4 heads, 2 kv heads)
    model.safetensors   seeded f32 weights, HF names (norm weights off 1, so their gradient counts)
    batch.json          {"batch", "seq", "inputs", "targets"}: a [2, 70] batch (two query blocks)
    grads.safetensors   "loss" [1] and every parameter's gradient of the mean cross-entropy,
                        computed in float64 (the engine's f32 gradients are compared with a
                        relative tolerance)
    adamw.safetensors   two torch.optim.AdamW steps (f32) on those gradients after clipping their
                        global norm to 0.5 (torch.nn.utils.clip_grad_norm_): "param.NAME",
                        "exp_avg.NAME", "exp_avg_sq.NAME"; lr 1e-2, betas (0.9, 0.95), eps 1e-8,
                        weight decay 0.1 on matrices and 0 on norm weights (the trainer's groups)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import torch_llama  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "engine_ref")
CFG = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 40,
    "max_position_embeddings": 160,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
B, T = 2, 70
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
CLIP = 0.5


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    model = torch_llama(CFG, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.5 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(CFG, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               tie_word_embeddings=False, attention_bias=False, mlp_bias=False, torch_dtype="float32")
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    with open(os.path.join(OUT, "batch.json"), "w") as f:
        json.dump({"batch": B, "seq": T, "inputs": x.flatten().tolist(), "targets": y.flatten().tolist()}, f)

    # Gradients in float64: the exact answer the f32 engine approximates.
    m64 = torch_llama(CFG, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in state.items()})
    logits = m64(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, CFG["vocab_size"]), y.reshape(-1))
    loss.backward()
    grads = {n: p.grad.float().contiguous() for n, p in m64.named_parameters()}
    grads["loss"] = loss.detach().float().reshape(1)
    save_file(grads, os.path.join(OUT, "grads.safetensors"))

    # Two AdamW steps in f32 on those gradients (clipped), the trainer's parameter groups.
    m32 = torch_llama(CFG, torch.float32)
    m32.load_state_dict(state)
    named = list(m32.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2]
    plain = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}],
                            foreach=False, **ADAMW)
    for _ in range(2):
        for n, p in named:
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(m32.parameters(), CLIP)
        opt.step()
    out = {}
    for n, p in named:
        st = opt.state[p]
        out[f"param.{n}"] = p.detach().contiguous()
        out[f"exp_avg.{n}"] = st["exp_avg"].contiguous()
        out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].contiguous()
    save_file(out, os.path.join(OUT, "adamw.safetensors"))
    print(f"wrote {OUT}: loss {loss.item():.6f}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
