#!/usr/bin/env python3
"""Export K/V activation dumps (and squared loss gradients) from a PyTorch LLaMA-style model,
in the layout cq-calibrate reads: .npy arrays [layer][kv_head][token][head_dim].

Forward hooks on the key and value projections capture their outputs, which in LLaMA-style models
are the keys *before* RoPE and the values; a tensor hook on each output captures the gradient of the
loss with respect to it, squared (the diagonal Fisher weights of CQ's Fisher-weighted k-means).
With `rotate=` the dumper also writes the keys *after* RoPE (k_post.npy): the callable rotates
captured keys [batch, seq, n_kv_heads, head_dim] to positions 0..seq-1 the model's way
(`hf_rotate(model)` for Hugging Face models, the toy's own apply_rope in the demo). Calibrate with
`cq-calibrate --key-rope pre` on k.npy (the paper's choice) or `--key-rope post` on k_post.npy.

Use it as a library with your own model and data:

    dumper = KVDumper(k_modules, v_modules, n_kv_heads, head_dim, grads=True)
    for tokens in calibration_batches:            # each [batch, seq]
        loss = cross_entropy_sum(model(tokens), targets)
        loss.backward()                           # only needed with grads=True
    dumper.save("dumps/")                         # k.npy, v.npy, k_grad2.npy, v_grad2.npy (+ k_post.npy)
    dumper.remove()

(find_kv_modules() finds the projections of Hugging Face LLaMA models, `self_attn.k_proj` /
`v_proj`, and of the toy model, `attention.wk` / `wv`.)

Or run the demo on the toy transformer of examples/toy_transformer:

    python3 tools/export_kv_dumps.py --toy examples/toy_transformer --tokens 2048 --out dumps
    build/tools/cq-calibrate --keys dumps/k.npy --values dumps/v.npy --key-rope pre --rope-theta 10000 \
        --key-grads dumps/k_grad2.npy --value-grads dumps/v_grad2.npy --method fisher --out cb.safetensors
"""

import argparse
import os
import sys

import numpy as np
import torch


def find_kv_modules(model):
    """(k_modules, v_modules) in layer order: HF LLaMA k_proj/v_proj, or the toy model's wk/wv."""
    ks, vs = [], []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "wk"):
            ks.append(mod)
        elif leaf in ("v_proj", "wv"):
            vs.append(mod)
    if not ks or len(ks) != len(vs):
        raise ValueError("could not find one key and one value projection per layer")
    return ks, vs


def hf_rotate(model):
    """A rotate callable for Hugging Face LLaMA-style models: the model's own rotary embedding
    (its rope_scaling included) and transformers' rotate_half pairing."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

    rotary = model.model.rotary_emb

    def rotate(k):  # [B, T, H, D]
        pos = torch.arange(k.shape[1], device=k.device)[None].expand(k.shape[0], -1)
        cos, sin = rotary(k, pos)
        x = k.transpose(1, 2)  # [B, H, T, D]
        return apply_rotary_pos_emb(x, x, cos, sin)[1].transpose(1, 2)

    return rotate


class KVDumper:
    """Collects projection outputs (and squared gradients) per layer across calls."""

    def __init__(self, k_modules, v_modules, n_kv_heads, head_dim, grads=True, dtype=np.float16, rotate=None):
        self.n_kv_heads, self.head_dim, self.grads, self.dtype = n_kv_heads, head_dim, grads, dtype
        self.rotate = rotate
        self.acts = {"k": [[] for _ in k_modules], "v": [[] for _ in v_modules]}
        if rotate is not None:
            self.acts["k_post"] = [[] for _ in k_modules]
        self.grad2 = {"k": [[] for _ in k_modules], "v": [[] for _ in v_modules]}
        self.handles = []
        for kind, mods in (("k", k_modules), ("v", v_modules)):
            for layer, mod in enumerate(mods):
                self.handles.append(mod.register_forward_hook(self._hook(kind, layer)))

    def _split(self, t):
        # [batch, seq, n_kv_heads * head_dim] -> [n_kv_heads, batch * seq, head_dim]
        b, s, _ = t.shape
        return t.reshape(b * s, self.n_kv_heads, self.head_dim).permute(1, 0, 2).float().cpu().numpy()

    def _hook(self, kind, layer):
        def fn(module, inputs, output):
            self.acts[kind][layer].append(self._split(output.detach()))
            if kind == "k" and self.rotate is not None:
                b, t, _ = output.shape
                k = output.detach().reshape(b, t, self.n_kv_heads, self.head_dim)
                self.acts["k_post"][layer].append(self._split(self.rotate(k).reshape(b, t, -1)))
            if self.grads and output.requires_grad:
                output.register_hook(lambda g: self.grad2[kind][layer].append(self._split(g.detach() ** 2)))
        return fn

    def arrays(self):
        """{'k': [L, H, N, D], 'v': ..., and with grads 'k_grad2', 'v_grad2'} as numpy arrays."""
        out = {}
        for kind in self.acts:
            out[kind] = np.stack([np.concatenate(chunks, axis=1) for chunks in self.acts[kind]])
            if self.grads and kind != "k_post":
                # Gradients arrive in reverse layer order during backward but are stored per layer.
                out[kind + "_grad2"] = np.stack([np.concatenate(chunks, axis=1) for chunks in self.grad2[kind]])
        return out

    def save(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        for name, a in self.arrays().items():
            if name.endswith("grad2"):
                a = a / max(float(a.mean()), 1e-30)  # scale to O(1) so float16 keeps the weights
            np.save(os.path.join(out_dir, name + ".npy"), a.astype(self.dtype))
            print(f"wrote {out_dir}/{name}.npy {list(a.shape)} {np.dtype(self.dtype).name}")

    def remove(self):
        for h in self.handles:
            h.remove()


def toy_demo(toy_dir, tokens, seq, out_dir):
    sys.path.insert(0, toy_dir)
    from model import ModelArgs, Transformer, apply_rope  # noqa: E402  (examples/toy_transformer/model.py)
    import struct, json

    # Load the fp16 safetensors weights written by train.py (no safetensors package needed).
    path = os.path.join(toy_dir, "model", "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    args = ModelArgs(**{k: type(getattr(ModelArgs, k))(meta[k]) for k in
                        ("vocab", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "max_seq_len")})
    model = Transformer(args)
    state = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        state[name] = torch.from_numpy(np.frombuffer(data[b:e], dtype=np.float16).reshape(t["shape"]).astype(np.float32))
    model.load_state_dict(state)

    text = open(os.path.join(toy_dir, "data", "heldout.txt"), "rb").read()
    k_mods, v_mods = find_kv_modules(model)
    def rotate(k):  # [B, T, H, D], the toy's RoPE tables
        return apply_rope(k, model.rope_cos[:k.shape[1]], model.rope_sin[:k.shape[1]])

    dumper = KVDumper(k_mods, v_mods, args.n_kv_heads, args.head_dim, grads=True, rotate=rotate)
    for start in range(0, tokens, seq):
        chunk = torch.tensor(list(text[start:start + seq + 1]), dtype=torch.long)[None]
        logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        model.zero_grad()
    dumper.save(out_dir)
    dumper.remove()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", help="examples/toy_transformer directory (demo on the toy model)", required=True)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--out", default="dumps")
    a = p.parse_args()
    toy_demo(a.toy, a.tokens, a.seq, a.out)
