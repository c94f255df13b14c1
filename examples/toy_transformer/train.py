#!/usr/bin/env python3
"""Trains the toy byte-level LLaMA (model.py) on data/train.txt and exports everything the C++ side
needs: fp16 weights, reference logits and calibration gradients for the keys / values.

  python3 train.py --data data --out out --device cuda --seconds 150
  python3 train.py --smoke                      # tiny CPU run that exercises every code path

Needs only torch (1.13 .. 2.x) and numpy (1.x or 2.x). Outputs in --out:
  model.safetensors             fp16 weights (names as in model.py) + string metadata
  reference_logits.safetensors  "tokens" I32 [64] (first 64 bytes of heldout.txt) and
                                "logits" F32 [64, 256]: fp32 forward of the fp16 weights, positions 0..63
  calib_{k,v}_grad2_l{01,23}.npy  float16 [2 layers, 2 kv heads, calib_tokens, 128]: squared
                                gradients of the summed next-byte cross-entropy w.r.t. the pre-RoPE
                                keys / the values, each (layer, kv head) slice divided by its mean
  calib_info.json               how the calibration data was made (offset, tokens, means, ...)
  train_log.json                arguments, eval history and final numbers
"""

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ModelArgs, Transformer, num_params  # noqa: E402

EVAL_WINDOW = 512          # held-out windows: non-overlapping 512-byte slices, predict bytes 1..511
REF_TOKENS = 64            # reference logits: first 64 bytes of heldout.txt
CALIB_SEQ = 512            # calibration sequence length
ESTIMATE_AT = 20           # time-limited runs: plan the step count after this many steps
ESTIMATE_FROM = 5          # ... timing steps ESTIMATE_FROM..ESTIMATE_AT (skips warm-up)


# ----------------------------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train the cq toy byte-level transformer.")
    ap.add_argument("--data", default="data", help="directory with train.txt and heldout.txt")
    ap.add_argument("--out", default="out", help="output directory")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="training time budget when --max-steps is not given (default 150)")
    ap.add_argument("--max-steps", type=int, default=None, help="fixed number of optimizer steps")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 64)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default 512)")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens, a multiple of 512 (default 12288)")
    ap.add_argument("--calib-offset", type=int, default=1000000, help="byte offset into train.txt")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 200)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evals (default 500)")
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="use only the first N held-out windows (default: all)")
    ap.add_argument("--log-every", type=int, default=None, help="steps between progress lines (100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sdpa", action="store_true",
                    help="never use F.scaled_dot_product_attention while training")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU-friendly run: batch 4, seq 128, 40 steps, 1024 calib tokens, "
                         "8 eval windows (explicit flags still win)")
    args = ap.parse_args(argv)

    if args.smoke:
        smoke = dict(batch=4, seq=128, calib_tokens=1024, warmup=10, eval_every=10,
                     eval_windows=8, log_every=10)
        if args.max_steps is None and args.seconds is None:
            smoke["max_steps"] = 40
    else:
        smoke = {}
    full = dict(batch=64, seq=512, calib_tokens=12288, warmup=200, eval_every=500, log_every=100,
                seconds=150.0)
    for k, v in full.items():
        if getattr(args, k, None) is None:
            setattr(args, k, smoke.get(k, v))
    for k in ("max_steps", "eval_windows"):
        if getattr(args, k) is None and k in smoke:
            setattr(args, k, smoke[k])
    if args.seq < 2 or args.seq > ModelArgs().max_seq_len:
        ap.error("--seq must be in [2, %d]" % ModelArgs().max_seq_len)
    if args.calib_tokens <= 0 or args.calib_tokens % CALIB_SEQ:
        ap.error("--calib-tokens must be a positive multiple of %d" % CALIB_SEQ)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ----------------------------------------------------------------------------------------------
# file formats

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, numpy array); metadata: {str: str}. Written by hand (no dependency)."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, arr in tensors:
        arr = np.asarray(arr)
        if arr.dtype not in _ST_DTYPES:
            raise TypeError("unsupported dtype %s for %s" % (arr.dtype, name))
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": [int(d) for d in arr.shape],
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("ascii")
    hjson += b" " * ((-(8 + len(hjson))) % 8)          # data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def save_npy(path, arr):
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_bytes(path):
    with open(path, "rb") as f:
        return torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8).copy())


# ----------------------------------------------------------------------------------------------
# data

class Batcher:
    """Random (seq+1)-byte crops; crop starts come from a CPU torch.Generator seeded with `seed`."""

    def __init__(self, data, batch, seq, device, seed):
        self.data = data.to(device)
        self.batch, self.seq, self.device = batch, seq, device
        self.gen = torch.Generator().manual_seed(seed)
        self.ar = torch.arange(seq + 1, device=device)

    def next(self):
        starts = torch.randint(0, len(self.data) - self.seq, (self.batch,), generator=self.gen)
        crop = self.data[starts.to(self.device)[:, None] + self.ar].long()
        return crop[:, :-1], crop[:, 1:]


def heldout_windows(held, max_windows=None):
    """Non-overlapping EVAL_WINDOW-byte windows (the last may be shorter; >= 2 bytes)."""
    wins = [held[i:i + EVAL_WINDOW] for i in range(0, len(held), EVAL_WINDOW)]
    wins = [w for w in wins if len(w) >= 2]
    if max_windows is not None:
        wins = wins[:max_windows]
    return wins


def eval_targets(windows):
    return torch.cat([w[1:] for w in windows]).long()


@torch.no_grad()
def evaluate(model, windows, device, ctx, batch):
    """Mean next-byte cross-entropy (nats/byte) over bytes 1.. of every window."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == EVAL_WINDOW]
    rest = [w for w in windows if len(w) != EVAL_WINDOW]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in rest]
    for g in groups:
        x = torch.stack(g).to(device).long()
        with ctx():
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_loss(train, targets):
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0   # add-one smoothing
    logp = torch.log(counts / counts.sum())
    return float(-logp[targets].mean())


# ----------------------------------------------------------------------------------------------
# training

def make_optimizer(model, lr, device):
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        for extra in ({"fused": True}, {"foreach": True}):
            try:
                return torch.optim.AdamW(groups, **kw, **extra), next(iter(extra))
            except (TypeError, RuntimeError, ValueError):
                pass
    return torch.optim.AdamW(groups, **kw), "default"


def lr_at(step, base_lr, warmup, planned):
    """step = 0-based index of the step about to be taken."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    total = max(planned - warmup, 1)
    progress = min(max(step - warmup, 0) / total, 1.0)
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_steps(step, elapsed, per_step, t_eval, eval_every, seconds):
    """Steps that still fit into the time budget (leaving room for the periodic and final evals)."""
    remaining = seconds - elapsed - 1.5 * t_eval
    n = int(0.97 * remaining / (per_step + t_eval / eval_every))
    return step + max(n, 0)


def train(args, device, model, train_data, windows, ctx, eval_batch):
    warmup = args.warmup
    planned = args.max_steps
    if planned is not None:
        warmup = max(1, min(warmup, planned // 5)) if planned < 5 * warmup else warmup
    opt, opt_kind = make_optimizer(model, args.lr, device)
    batcher = Batcher(train_data, args.batch, args.seq, device, args.seed)
    print("optimizer: AdamW (%s), warmup %d, lr %g, batch %d x %d" % (
        opt_kind, warmup, args.lr, args.batch, args.seq), flush=True)

    history = []
    t0 = time.time()
    te = time.time()
    best = evaluate(model, windows, device, ctx, eval_batch)
    t_eval = time.time() - te
    best_step = 0
    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    history.append({"step": 0, "heldout_loss": best, "elapsed": time.time() - t0})
    print("step %6d  heldout %.4f  (eval %.2fs)" % (0, best, t_eval), flush=True)

    model.train()
    step = 0
    loss_acc = torch.zeros((), device=device)
    n_acc = 0
    t_log, tok_log = time.time(), 0
    t_est = None
    last_eval_step = 0

    def record_eval(step, suffix=""):
        """Evaluates held-out loss at `step`, keeping the best weights so far."""
        nonlocal best, best_step, best_state, last_eval_step
        h = evaluate(model, windows, device, ctx, eval_batch)
        last_eval_step = step
        history.append({"step": step, "heldout_loss": h, "elapsed": time.time() - t0})
        mark = ""
        if h < best:
            best, best_step, mark = h, step, "  (best)"
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        print("step %6d  heldout %.4f%s%s" % (step, h, mark, suffix), flush=True)

    while True:
        if planned is not None and step >= planned:
            break
        if args.max_steps is None and time.time() - t0 > args.seconds:
            print("time budget reached at step %d" % step, flush=True)
            break
        lr = lr_at(step, args.lr, warmup, planned if planned is not None else 10 ** 9)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batcher.next()
        with ctx():
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_acc += loss.detach()
        n_acc += 1
        tok_log += x.numel()

        if args.max_steps is None and step in (ESTIMATE_FROM, ESTIMATE_AT, warmup) \
                and step >= ESTIMATE_FROM:
            sync(device)
            now = time.time()
            if step == ESTIMATE_FROM:
                t_est = (step, now)
            elif step <= warmup or planned is None:
                # Before the cosine phase starts the schedule does not depend on `planned`, so it
                # can be refined once more at the end of warm-up.
                per_step = (now - t_est[1]) / (step - t_est[0])
                planned = plan_steps(step, now - t0, per_step, t_eval, args.eval_every, args.seconds)
                planned = max(planned, step)
                print("step %d: %.2f ms/step -> planning %d steps for %.0f s" % (
                    step, 1000 * per_step, planned, args.seconds), flush=True)

        if step % args.log_every == 0:
            sync(device)
            now = time.time()
            print("step %6d  loss %.4f  lr %.2e  %8.0f tok/s  %7.1fs" % (
                step, (loss_acc / n_acc).item(), lr, tok_log / (now - t_log), now - t0), flush=True)
            loss_acc.zero_()
            n_acc = 0
            t_log, tok_log = now, 0

        if step % args.eval_every == 0 and (planned is None or step < planned):
            record_eval(step)
            t_log = time.time()  # keep eval time out of the tokens/s figure

    if last_eval_step != step:
        record_eval(step, " (final)")
    sync(device)
    seconds = time.time() - t0
    return dict(state=best_state, best=best, best_step=best_step, steps=step,
                tokens=step * args.batch * args.seq, seconds=seconds, history=history,
                warmup=warmup, optimizer=opt_kind)


# ----------------------------------------------------------------------------------------------
# exports

def fp16_model(state):
    """(fp16 state dict, fp32 model holding exactly the fp16-rounded weights) on the CPU."""
    sd16 = {k: v.to(torch.float16) for k, v in state.items()}
    m = Transformer()
    m.load_state_dict({k: v.float() for k, v in sd16.items()})
    m.eval()
    return sd16, m


def calibration(args, model, train_data, device):
    """Squared d(sum CE)/d(k_pre) and d/d(v), [layer, kv_head, token, head_dim] float32 numpy."""
    a = model.args
    n, L, o = args.calib_tokens, CALIB_SEQ, args.calib_offset
    if o + n + 1 > len(train_data):
        raise ValueError("train.txt too short for %d calibration tokens at offset %d" % (n, o))
    nseq = n // L
    chunk = 8 if device.type == "cuda" else 2
    kg = np.zeros((a.n_layers, a.n_kv_heads, n, a.head_dim), dtype=np.float32)
    vg = np.zeros_like(kg)
    total_loss = 0.0
    seg = train_data[o:o + n + 1].long()
    for j0 in range(0, nseq, chunk):
        j1 = min(j0 + chunk, nseq)
        x = torch.stack([seg[L * j:L * j + L] for j in range(j0, j1)]).to(device)
        y = torch.stack([seg[L * j + 1:L * j + L + 1] for j in range(j0, j1)]).to(device)
        logits, ks, vs = model(x, capture=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, ks + vs)
        total_loss += loss.item()
        for l in range(a.n_layers):
            for dst, g in ((kg, grads[l]), (vg, grads[a.n_layers + l])):
                g2 = g.detach().float().pow(2).permute(2, 0, 1, 3)          # [Hkv, b, T, D]
                dst[l, :, L * j0:L * j1] = g2.reshape(a.n_kv_heads, -1, a.head_dim).cpu().numpy()
    return kg, vg, total_loss


def normalise_f16(g):
    """Divide each [layer, kv_head] slice by its mean; returns (float16 array, stats)."""
    out = np.empty(g.shape, dtype=np.float16)
    means, maxes, clipped, zeros = [], [], 0, 0
    f16max = float(np.finfo(np.float16).max)
    for l in range(g.shape[0]):
        ml, xl = [], []
        for h in range(g.shape[1]):
            s = g[l, h].astype(np.float64)
            m = float(s.mean())
            r = s / m if m > 0 else s
            clipped += int((r > f16max).sum())
            r16 = np.minimum(r, f16max).astype(np.float16)
            zeros += int(((r16 == 0) & (s > 0)).sum())
            out[l, h] = r16
            ml.append(m)
            xl.append(float(r.max()))
        means.append(ml)
        maxes.append(xl)
    return out, {"slice_means": means, "slice_max_after_norm": maxes,
                 "clipped_to_f16_max": clipped, "underflowed_to_zero": zeros}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        # Reference computations (final eval, logits, calibration) must be true fp32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        ctx = lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        ctx = contextlib.nullcontext
    fp32_ctx = contextlib.nullcontext
    eval_batch = 64 if device.type == "cuda" else 8
    os.makedirs(args.out, exist_ok=True)

    train_data = load_bytes(os.path.join(args.data, "train.txt"))
    held = load_bytes(os.path.join(args.data, "heldout.txt"))
    windows = heldout_windows(held, args.eval_windows)
    targets = eval_targets(windows)
    uni = unigram_loss(train_data, targets)
    print("torch %s, numpy %s, device %s%s" % (
        torch.__version__, np.__version__, device,
        " (%s)" % torch.cuda.get_device_name(device) if device.type == "cuda" else ""), flush=True)
    print("train.txt %d bytes, heldout.txt %d bytes, %d eval windows (%d predicted bytes)" % (
        len(train_data), len(held), len(windows), len(targets)), flush=True)
    print("unigram baseline: %.4f nats/byte (ppl %.3f)" % (uni, math.exp(uni)), flush=True)

    torch.manual_seed(args.seed)
    model = Transformer().to(device)
    use_sdpa = device.type == "cuda" and not args.no_sdpa and \
        hasattr(F, "scaled_dot_product_attention")
    model.set_sdpa(use_sdpa, torch.bfloat16 if use_sdpa else None)
    print("model: %d parameters, sdpa=%s" % (num_params(model), use_sdpa), flush=True)

    r = train(args, device, model, train_data, windows, ctx, eval_batch)
    del model

    # ---- fp16 weights, and an fp32 model holding exactly those weights
    sd16, m32 = fp16_model(r["state"])
    m32 = m32.to(device)
    held_loss = evaluate(m32, windows, device, fp32_ctx, eval_batch)
    a = m32.args
    meta = {
        "format": "cq-toy-llama", "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "ffn_hidden": a.ffn_hidden,
        "vocab": a.vocab, "rope_theta": repr(float(a.rope_theta)), "norm_eps": repr(float(a.norm_eps)),
        "max_seq_len": a.max_seq_len,
        "heldout_loss": "%.6f" % held_loss, "unigram_loss": "%.6f" % uni,
        "heldout_predicted_bytes": len(targets), "best_step": r["best_step"],
        "train_steps": r["steps"], "train_tokens": r["tokens"], "train_seconds": "%.1f" % r["seconds"],
        "torch_version": torch.__version__, "device": str(device) + (
            " (%s)" % torch.cuda.get_device_name(device) if device.type == "cuda" else ""),
        "rope": "rotate_half (dim i paired with i+64)", "smoke": str(bool(args.smoke)).lower(),
    }
    paths = {}
    paths["model"] = os.path.join(args.out, "model.safetensors")
    write_safetensors(paths["model"], [(k, v.numpy()) for k, v in sd16.items()], meta)

    # ---- reference logits, on the CPU in fp32 (manual attention path)
    _, mref = fp16_model(r["state"])
    ref_tokens = held[:REF_TOKENS].long()
    with torch.no_grad():
        ref_logits = mref(ref_tokens[None])[0].float()
        dev_logits = m32(ref_tokens[None].to(device))[0].float().cpu()
    ref_diff = float((ref_logits - dev_logits).abs().max())
    paths["reference"] = os.path.join(args.out, "reference_logits.safetensors")
    write_safetensors(paths["reference"], [
        ("tokens", ref_tokens.numpy().astype(np.int32)),
        ("logits", ref_logits.numpy().astype(np.float32)),
    ], {"format": "cq-toy-llama-reference", "weights": "model.safetensors (fp16) upcast to fp32",
        "positions": "0..%d" % (REF_TOKENS - 1), "source": "first %d bytes of heldout.txt" % REF_TOKENS,
        "compute": "float32 on cpu, torch %s" % torch.__version__})

    # ---- calibration gradients
    tc = time.time()
    kg, vg, calib_loss = calibration(args, m32, train_data, device)
    k16, kstats = normalise_f16(kg)
    v16, vstats = normalise_f16(vg)
    del kg, vg
    files = []
    for name, arr in (("k", k16), ("v", v16)):
        for l0 in range(0, arr.shape[0], 2):
            fn = "calib_%s_grad2_l%s.npy" % (name, "".join(str(l) for l in range(l0, min(l0 + 2, arr.shape[0]))))
            save_npy(os.path.join(args.out, fn), np.ascontiguousarray(arr[l0:l0 + 2]))
            paths[fn] = os.path.join(args.out, fn)
            files.append({"file": fn, "tensor": name, "layers": list(range(l0, min(l0 + 2, arr.shape[0]))),
                          "shape": list(arr[l0:l0 + 2].shape)})
    info = {
        "source": "train.txt", "offset": args.calib_offset, "tokens": args.calib_tokens,
        "seq_len": CALIB_SEQ, "n_sequences": args.calib_tokens // CALIB_SEQ,
        "sequences": "sequence j: inputs = train[o+512j : o+512j+512], targets = train[o+512j+1 : o+512j+513],"
                     " positions 0..511; token index = 512j + position",
        "weights": "model.safetensors (fp16 rounded) evaluated in float32",
        "loss": "sum over all tokens of next-byte cross-entropy (nats)",
        "loss_sum": calib_loss, "loss_mean_per_token": calib_loss / args.calib_tokens,
        "quantity": "squared gradient of the loss w.r.t. the pre-RoPE keys (k) and the values (v)",
        "layout": "[layer][kv_head][token][head_dim]", "dtype": "float16",
        "normalisation": "each [layer][kv_head] slice (tokens x head_dim) divided by its own mean, "
                         "computed in float64 before rounding to float16; the means are slice_means",
        "files": files, "k": kstats, "v": vstats,
        "device": str(device), "torch_version": torch.__version__, "seconds": time.time() - tc,
    }
    paths["calib_info"] = os.path.join(args.out, "calib_info.json")
    with open(paths["calib_info"], "w") as f:
        json.dump(info, f, indent=1)

    log = {"args": vars(args), "history": r["history"], "best_heldout_during_training": r["best"],
           "best_step": r["best_step"], "heldout_loss_fp16_weights_fp32": held_loss,
           "unigram_loss": uni, "steps": r["steps"], "tokens": r["tokens"], "seconds": r["seconds"],
           "warmup": r["warmup"], "optimizer": r["optimizer"], "sdpa": use_sdpa,
           "reference_logits_cpu_vs_device_maxabs": ref_diff}
    paths["log"] = os.path.join(args.out, "train_log.json")
    with open(paths["log"], "w") as f:
        json.dump(log, f, indent=1)

    print("=" * 72)
    print("held-out loss : %.4f nats/byte  ppl %.3f   (fp16 weights, fp32 compute, best step %d)" % (
        held_loss, math.exp(held_loss), r["best_step"]))
    print("  during train: %.4f (%s)" % (r["best"], "bf16 autocast" if device.type == "cuda" else "fp32"))
    print("unigram loss  : %.4f nats/byte  ppl %.3f" % (uni, math.exp(uni)))
    print("steps %d, tokens %d, train seconds %.1f (%.0f tok/s)" % (
        r["steps"], r["tokens"], r["seconds"], r["tokens"] / max(r["seconds"], 1e-9)))
    print("calibration: %d tokens, mean loss %.4f, k max/mean %.1f, v max/mean %.1f, clipped %d, "
          "underflow %d" % (args.calib_tokens, calib_loss / args.calib_tokens,
                            max(max(x) for x in kstats["slice_max_after_norm"]),
                            max(max(x) for x in vstats["slice_max_after_norm"]),
                            kstats["clipped_to_f16_max"] + vstats["clipped_to_f16_max"],
                            kstats["underflowed_to_zero"] + vstats["underflowed_to_zero"]))
    print("reference logits cpu vs %s max |diff|: %.3g" % (device, ref_diff))
    for p in paths.values():
        print("  %-44s %10d bytes" % (p, os.path.getsize(p)))
    print("=" * 72, flush=True)


if __name__ == "__main__":
    main()
