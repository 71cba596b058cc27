#!/usr/bin/env python3
"""Train a small char/byte-level decoder-only transformer with JAX + optax and
save a real series of training checkpoints (safetensors) for benchmarking a
checkpoint compressor.

Phase 1: pretrain on Python standard-library source (AdamW, lr 3e-4, warmup + cosine).
Phase 2: fine-tune from phase 1's final state (params AND AdamW state carried over)
         on license/copyright text at lr 2e-5, with token/position embeddings and
         the lower half of the blocks frozen: frozen params get exactly zero update
         and their AdamW mu/nu are left bit-for-bit as they were.

Checkpoint tensor names (one f32 file per checkpoint):
  params.<name>   f32 parameter
  opt.mu.<name>   f32 AdamW first moment
  opt.nu.<name>   f32 AdamW second moment
  opt.count       int64 scalar, number of AdamW updates applied so far (global)
plus a separate <stem>.bf16.safetensors with params.<name> as BF16.
<name> is e.g. blocks.0.attn.qkv.weight (weights are stored [out, in], PyTorch style).
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from safetensors.numpy import save_file

# ----------------------------------------------------------------------------- data

PY_LIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"


def load_pretrain_corpus():
    """Top-level modules of the CPython 3.11.7 standard library (*.py), sorted by name."""
    files = sorted(glob.glob(os.path.join(PY_LIB, "*.py")))
    data = b"".join(open(f, "rb").read() + b"\n" for f in files)
    return np.frombuffer(data, dtype=np.uint8), files


def load_finetune_corpus():
    """Debian license texts: /usr/share/common-licenses/* and /usr/share/doc/*/copyright,
    de-duplicated by content, sorted by path."""
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    files += sorted(p for p in glob.glob("/usr/share/doc/*/copyright") if os.path.isfile(p))
    seen, chunks, used = set(), [], []
    for f in files:
        b = open(f, "rb").read()
        if b in seen:
            continue
        seen.add(b)
        chunks.append(b + b"\n")
        used.append(f)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), used


def split(data, frac=0.95):
    n = int(len(data) * frac)
    return data[:n], data[n:]


def get_batch(rng, data, batch, ctx):
    ix = rng.integers(0, len(data) - ctx - 1, size=batch)
    x = np.stack([data[i:i + ctx] for i in ix]).astype(np.int32)
    y = np.stack([data[i + 1:i + ctx + 1] for i in ix]).astype(np.int32)
    return x, y

# ----------------------------------------------------------------------------- model


def init_params(key, vocab, ctx, d, n_layer, n_head):
    p = {}
    keys = iter(jax.random.split(key, 8 * n_layer + 8))
    nrm = lambda shape, std=0.02: np.asarray(std * jax.random.normal(next(keys), shape, jnp.float32))
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    p["tok_emb.weight"] = nrm((vocab, d))
    p["pos_emb.weight"] = nrm((ctx, d), 0.01)
    for i in range(n_layer):
        b = f"blocks.{i}."
        p[b + "ln1.weight"] = np.ones(d, np.float32)
        p[b + "ln1.bias"] = np.zeros(d, np.float32)
        p[b + "attn.qkv.weight"] = nrm((3 * d, d))
        p[b + "attn.qkv.bias"] = np.zeros(3 * d, np.float32)
        p[b + "attn.proj.weight"] = nrm((d, d), proj_std)
        p[b + "attn.proj.bias"] = np.zeros(d, np.float32)
        p[b + "ln2.weight"] = np.ones(d, np.float32)
        p[b + "ln2.bias"] = np.zeros(d, np.float32)
        p[b + "mlp.fc.weight"] = nrm((4 * d, d))
        p[b + "mlp.fc.bias"] = np.zeros(4 * d, np.float32)
        p[b + "mlp.proj.weight"] = nrm((d, 4 * d), proj_std)
        p[b + "mlp.proj.bias"] = np.zeros(d, np.float32)
    p["ln_f.weight"] = np.ones(d, np.float32)
    p["ln_f.bias"] = np.zeros(d, np.float32)
    p["lm_head.weight"] = nrm((vocab, d))  # untied
    return {k: jnp.asarray(v) for k, v in p.items()}


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


def linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def forward(p, idx, n_layer, n_head):
    B, T = idx.shape
    x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][:T]
    d = x.shape[-1]
    hd = d // n_head
    mask = jnp.tril(jnp.ones((T, T), bool))
    for i in range(n_layer):
        b = f"blocks.{i}."
        h = layer_norm(x, p[b + "ln1.weight"], p[b + "ln1.bias"])
        qkv = linear(h, p, b + "attn.qkv")
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)
        att = jnp.where(mask, att, -1e30)
        att = jax.nn.softmax(att, axis=-1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
        x = x + linear(y, p, b + "attn.proj")
        h = layer_norm(x, p[b + "ln2.weight"], p[b + "ln2.bias"])
        h = jax.nn.gelu(linear(h, p, b + "mlp.fc"))
        x = x + linear(h, p, b + "mlp.proj")
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p["lm_head.weight"].T


def xent(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1).mean()

# ----------------------------------------------------------------------------- optimizer / steps


def decay_mask(params):
    # standard GPT practice: decay the 2-D weight matrices only (not biases / LayerNorm / embeddings)
    return {k: (v.ndim == 2 and not k.endswith("_emb.weight")) for k, v in params.items()}


def make_opt(lr, params, wd):
    # Same transform chain in both phases so the optimizer state structure is identical
    # and can be carried from pretrain into fine-tune unchanged.
    return optax.adamw(learning_rate=lr, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=wd, mask=decay_mask(params))


def adam_state(state):
    return state[0]  # ScaleByAdamState(count, mu, nu)


def make_train_step(opt, n_layer, n_head, frozen):
    """frozen: set of param names that get exactly zero update and keep their AdamW state."""

    def loss_fn(trainable, fixed, x, y):
        p = dict(trainable)
        p.update({k: jax.lax.stop_gradient(v) for k, v in fixed.items()})
        return xent(forward(p, x, n_layer, n_head), y)

    @jax.jit
    def step(params, state, x, y):
        trainable = {k: v for k, v in params.items() if k not in frozen}
        fixed = {k: v for k, v in params.items() if k in frozen}
        loss, g = jax.value_and_grad(loss_fn)(trainable, fixed, x, y)
        grads = {k: (g[k] if k not in frozen else jnp.zeros_like(v)) for k, v in params.items()}
        updates, new_state = opt.update(grads, state, params)
        new_params = {k: (params[k] if k in frozen else params[k] + updates[k]) for k in params}
        if frozen:
            old, new = adam_state(state), adam_state(new_state)
            mu = {k: (old.mu[k] if k in frozen else new.mu[k]) for k in params}
            nu = {k: (old.nu[k] if k in frozen else new.nu[k]) for k in params}
            new_state = (new._replace(mu=mu, nu=nu),) + tuple(new_state[1:])
        return new_params, new_state, loss

    return step


def make_eval(n_layer, n_head):
    @jax.jit
    def ev(params, x, y):
        return xent(forward(params, x, n_layer, n_head), y)
    return ev

# ----------------------------------------------------------------------------- checkpoints


def save_ckpt(folder, step, params, state):
    os.makedirs(folder, exist_ok=True)
    a = adam_state(state)
    t = {}
    for k in params:
        t["params." + k] = np.asarray(params[k], dtype=np.float32)
    for k in params:
        t["opt.mu." + k] = np.asarray(a.mu[k], dtype=np.float32)
    for k in params:
        t["opt.nu." + k] = np.asarray(a.nu[k], dtype=np.float32)
    t["opt.count"] = np.array(int(a.count), dtype=np.int64)
    stem = os.path.join(folder, f"step-{step:06d}")
    save_file(t, stem + ".safetensors", metadata={"step": str(step), "opt_count": str(int(a.count))})
    bf = {"params." + k: np.asarray(params[k], dtype=np.float32).astype(ml_dtypes.bfloat16) for k in params}
    save_file(bf, stem + ".bf16.safetensors", metadata={"step": str(step)})

# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/var/tmp/bitsnap-series")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ft-lr", type=float, default=2e-5)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", type=int, default=0, help="only time N pretrain steps, save nothing")
    args = ap.parse_args()

    L, H = args.layers, args.heads
    V = 256  # byte-level vocabulary
    pre_data, pre_files = load_pretrain_corpus()
    ft_data, ft_files = load_finetune_corpus()
    pre_tr, pre_va = split(pre_data)
    ft_tr, ft_va = split(ft_data)
    print(f"pretrain corpus: {len(pre_files)} files, {len(pre_data)} bytes; "
          f"finetune corpus: {len(ft_files)} files, {len(ft_data)} bytes", flush=True)

    params = init_params(jax.random.PRNGKey(args.seed), V, args.ctx, args.d, L, H)
    n_params = sum(int(v.size) for v in params.values())
    print(f"model: {L} layers, d_model {args.d}, {H} heads, ctx {args.ctx}, vocab {V}, "
          f"{len(params)} tensors, {n_params} params", flush=True)

    rng = np.random.default_rng(args.seed)
    ev = make_eval(L, H)

    def val_loss(data, n=4):
        r = np.random.default_rng(1234)
        return float(np.mean([ev(params, *get_batch(r, data, args.batch, args.ctx)) for _ in range(n)]))

    # ---- phase 1
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.pretrain_steps, args.lr * 0.1)
    opt = make_opt(sched, params, args.wd)
    state = opt.init(params)
    step_fn = make_train_step(opt, L, H, frozen=set())
    P = args.pretrain_steps
    save_1 = set(range(100, 105))
    save_100 = set(range(100, P + 1, 100))
    log = {"pretrain": [], "finetune": [], "args": vars(args), "n_params": n_params,
           "pretrain_files": len(pre_files), "finetune_files": len(ft_files),
           "pretrain_bytes": int(len(pre_data)), "finetune_bytes": int(len(ft_data))}
    print(f"pretrain step 0 val loss {val_loss(pre_va):.4f}", flush=True)
    t0 = time.time()
    for s in range(1, (args.bench or P) + 1):
        x, y = get_batch(rng, pre_tr, args.batch, args.ctx)
        params, state, loss = step_fn(params, state, x, y)
        loss = float(loss)
        log["pretrain"].append(loss)
        if args.bench:
            print(f"step {s} loss {loss:.4f} {time.time() - t0:.1f}s", flush=True)
            continue
        if s in save_1:
            save_ckpt(os.path.join(args.out, "pretrain-1step"), s, params, state)
        if s in save_100:
            save_ckpt(os.path.join(args.out, "pretrain-100step"), s, params, state)
        if s % 25 == 0 or s == 1:
            print(f"pretrain step {s} loss {loss:.4f} lr {float(sched(s - 1)):.2e} "
                  f"t {time.time() - t0:.0f}s", flush=True)
    if args.bench:
        return
    t_pre = time.time() - t0
    vl = val_loss(pre_va)
    log["pretrain_val_end"] = vl
    log["pretrain_seconds"] = t_pre
    print(f"pretrain done in {t_pre:.0f}s, val loss {vl:.4f}; finetune-text val loss "
          f"before finetune {val_loss(ft_va):.4f}", flush=True)

    # ---- phase 2: carry params + AdamW state over; freeze embeddings + lower half
    frozen = {k for k in params if k.startswith(("tok_emb.", "pos_emb."))}
    frozen |= {k for k in params for i in range(L // 2) if k.startswith(f"blocks.{i}.")}
    n_frozen = sum(int(params[k].size) for k in frozen)
    print(f"finetune: {len(frozen)} frozen tensors ({n_frozen} params)", flush=True)
    log["frozen"] = sorted(frozen)
    log["finetune_val_start"] = val_loss(ft_va)
    ft_opt = make_opt(args.ft_lr, params, args.wd)  # constant lr; same state structure as phase 1
    ft_step = make_train_step(ft_opt, L, H, frozen=frozen)
    F = args.ft_steps
    save_1 = set(range(0, 5))
    save_50 = set(range(0, F + 1, 50))
    for d, ss in (("finetune-1step", save_1), ("finetune-50step", save_50)):
        if 0 in ss:
            save_ckpt(os.path.join(args.out, d), 0, params, state)
    t0 = time.time()
    for s in range(1, F + 1):
        x, y = get_batch(rng, ft_tr, args.batch, args.ctx)
        params, state, loss = ft_step(params, state, x, y)
        loss = float(loss)
        log["finetune"].append(loss)
        if s in save_1:
            save_ckpt(os.path.join(args.out, "finetune-1step"), s, params, state)
        if s in save_50:
            save_ckpt(os.path.join(args.out, "finetune-50step"), s, params, state)
        if s % 25 == 0 or s == 1:
            print(f"finetune step {s} loss {loss:.4f} t {time.time() - t0:.0f}s", flush=True)
    t_ft = time.time() - t0
    log["finetune_seconds"] = t_ft
    log["finetune_val_end"] = val_loss(ft_va)
    log["pretrain_val_after_ft"] = val_loss(pre_va)
    print(f"finetune done in {t_ft:.0f}s, ft val loss {log['finetune_val_end']:.4f}, "
          f"pretrain val loss after ft {log['pretrain_val_after_ft']:.4f}", flush=True)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
