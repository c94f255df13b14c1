"""Toy LLaMA-style byte-level transformer (the reference the C++ reimplementation must match).

Runs on torch 1.13 (CPU) and torch 2.x (CUDA); only torch is needed.

Hyper-parameters (ModelArgs)
  vocab=256 (one token per byte, token id = byte value), dim=256, n_layers=4, n_heads=4 (query heads),
  n_kv_heads=2, head_dim=128, ffn_hidden=768, rope_theta=10000, norm_eps=1e-5, max_seq_len=512.
  Parameters: 4,065,536 (~8.1 MB in fp16).

Weights (state_dict names and shapes; every Linear is bias-free and computes y = x @ W^T, i.e.
W has shape [out_features, in_features], row-major):
  tok_embeddings.weight              [256, 256]   row t = embedding of byte t
  layers.{i}.attention_norm.weight   [256]
  layers.{i}.attention.wq.weight     [512, 256]   rows h*128 .. h*128+127 = query head h (h = 0..3)
  layers.{i}.attention.wk.weight     [256, 256]   rows g*128 .. g*128+127 = kv head g (g = 0..1)
  layers.{i}.attention.wv.weight     [256, 256]   rows g*128 .. g*128+127 = kv head g
  layers.{i}.attention.wo.weight     [256, 512]   input column h*128 + d = dim d of head h's output
  layers.{i}.ffn_norm.weight         [256]
  layers.{i}.feed_forward.w1.weight  [768, 256]   gate
  layers.{i}.feed_forward.w3.weight  [768, 256]   up
  layers.{i}.feed_forward.w2.weight  [256, 768]   down
  norm.weight                        [256]
  output.weight                      [256, 256]   untied from tok_embeddings; logits = h @ W^T

Forward pass for tokens t_0 .. t_{T-1} (positions p = 0 .. T-1, T <= 512, every sequence starts at
position 0):
  x = tok_embeddings.weight[t]                                        [T, 256]
  for each layer i:
    a  = RMSNorm(x, attention_norm)
    q  = a @ wq^T -> [T, 4, 128];  k_pre = a @ wk^T -> [T, 2, 128];  v = a @ wv^T -> [T, 2, 128]
    q, k = RoPE(q), RoPE(k_pre)
    for query head h (kv head g = h // 2, i.e. heads 0,1 -> kv 0 and heads 2,3 -> kv 1):
      s[p, j] = dot(q[p, h], k[j, g]) / sqrt(128)  for j <= p   (causal; j > p is excluded)
      o[p, h] = sum_j softmax_j(s[p, :])[j] * v[j, g]
    x = x + concat_h(o[p, h]) @ wo^T                                 (head-major concat, 512 wide)
    f  = RMSNorm(x, ffn_norm)
    x = x + (silu(f @ w1^T) * (f @ w3^T)) @ w2^T                      silu(z) = z * sigmoid(z)
  logits = RMSNorm(x, norm) @ output^T                                [T, 256]

RMSNorm(x, w) = x * 1/sqrt(mean(x^2 over the 256 dims) + 1e-5) * w, computed in float32.

RoPE (HF-LLaMA "rotate_half" convention, NOT the interleaved-pairs convention), applied per head
vector x[0..127] at position p:
  inv_freq[i] = 10000^(-2i/128) = 10000^(-i/64),  i = 0 .. 63
  c_i = cos(p * inv_freq[i]),  s_i = sin(p * inv_freq[i])
  out[i]      = x[i]      * c_i - x[i + 64] * s_i      i = 0 .. 63
  out[i + 64] = x[i + 64] * c_i + x[i]      * s_i
i.e. dimension i is paired with dimension i + 64 (first half / second half), both rotated by the
same angle. The tables are computed in float64 and then rounded to float32.
Applied to q and k after the projections; v is not rotated. The keys "before RoPE" (k_pre above)
are what forward(capture=True) exposes.

Numerics: the reference is float32 everywhere (softmax in float32). During training on CUDA the
matmuls run under bf16 autocast, but norms, softmax and the logits/loss are float32.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 128
    ffn_hidden: int = 768
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 512


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def rope_tables(head_dim, max_seq_len, theta):
    """cos/sin tables [max_seq_len, head_dim] (each half repeated), float64 math rounded to float32."""
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / head_dim)
    pos = torch.arange(max_seq_len, dtype=torch.float64)
    ang = pos[:, None] * inv_freq[None, :]                       # [T, 64]
    cos = torch.cos(ang).to(torch.float32)
    sin = torch.sin(ang).to(torch.float32)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, H, D]; cos/sin: [T, D] (float32). Result is float32 (or wider if x is)."""
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Set by the trainer: use F.scaled_dot_product_attention when available (same math, fused).
        self.use_sdpa = False
        self.sdpa_dtype = None  # dtype q/k/v are cast to for SDPA (the autocast dtype), None = v's

    def forward(self, x, cos, sin, capture=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k_pre = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if capture is not None:
            if k_pre.requires_grad:
                k_pre.retain_grad()
                v.retain_grad()
            capture[0].append(k_pre)
            capture[1].append(v)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k_pre, cos, sin)

        # [B, H, T, D]; query head h reads kv head h // rep (repeat_interleave semantics).
        rep = self.n_heads // self.n_kv_heads
        q = q.transpose(1, 2)
        k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        vv = v.transpose(1, 2).repeat_interleave(rep, dim=1)

        if self.use_sdpa and hasattr(F, "scaled_dot_product_attention"):
            dt = self.sdpa_dtype or vv.dtype
            o = F.scaled_dot_product_attention(q.to(dt), k.to(dt), vv.to(dt), is_causal=True)
        else:
            o = self.manual_attention(q, k, vv)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(o)

    def manual_attention(self, q, k, v):
        T = q.shape[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        scores = scores.masked_fill(mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        return torch.matmul(p.to(v.dtype), v)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, capture=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, capture)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args=None):
        super().__init__()
        self.args = args = args or ModelArgs()
        self.tok_embeddings = nn.Embedding(args.vocab, args.dim)
        self.layers = nn.ModuleList([Block(args) for _ in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """N(0, 0.02) for embeddings/linears, residual outputs (wo, w2) scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = 0.02
                if name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight"):
                    std /= math.sqrt(2 * self.args.n_layers)
                nn.init.normal_(p, mean=0.0, std=std)

    def set_sdpa(self, enabled, dtype=None):
        """Use F.scaled_dot_product_attention (if this torch has it) instead of the manual path."""
        for layer in self.layers:
            layer.attention.use_sdpa = bool(enabled)
            layer.attention.sdpa_dtype = dtype

    def forward(self, tokens, capture=False):
        """tokens: [B, T] integer byte ids (T <= max_seq_len). Returns float32 logits [B, T, 256].

        With capture=True returns (logits, k_pre, v): lists (one per layer) of the pre-RoPE keys and
        the values, each [B, T, n_kv_heads, head_dim], still part of the autograd graph (and with
        .retain_grad() called when grad is enabled), so d loss / d k_pre etc. can be taken.
        """
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError("sequence length %d exceeds max_seq_len %d" % (T, self.args.max_seq_len))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        cap = ([], []) if capture else None
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cap)
        logits = self.output(self.norm(x))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if capture:
            return logits, cap[0], cap[1]
        return logits


def num_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    m = Transformer()
    print("parameters:", num_params(m))
    for k, v in m.state_dict().items():
        print("%-36s %s" % (k, list(v.shape)))
