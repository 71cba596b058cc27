#!/usr/bin/env python3
"""Train a GPT-2-style byte-level LM with PyTorch and a Megatron-style mixed-precision
recipe (fp32 master weights, bf16 model copy, bf16 autocast, AdamW fused on CUDA, warm-up +
cosine lr, grad clipping, weight decay) and write real checkpoint series as safetensors
files in a Megatron-style layout, for benchmarking bitsnap on data it never saw.

Modes (each a folder under --out; file names step-NNNNNN.safetensors, NNNNNN = optimizer
updates applied so far):

  pair      pretrain --pair-at updates, save; one more update, save          (2 files)
  series    pretrain --series-steps updates, save every --series-every      (e.g. 5 files)
  finetune  resume from series/'s last file, freeze the embeddings and the lower half
            of the layers, fine-tune on another text; save the resumed state and every
            --ft-every updates                                               (e.g. 4 files)
  all       the three in that order

Every run ends with summary.py's checks and tables for the series folders under --out.

--self-check runs `all` with --preset small and few steps in a temp folder, then asserts
the layout, the dtypes, bf16 == RNE(master) everywhere, that frozen tensors stay
bit-for-bit unchanged and that trained ones change, that AdamW's rule replays one update,
and that the same seed reproduces bit for bit. Exit status 0 = passed.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from model import PRESETS, Preset
from summary import print_summary, summarize
from trainer import KINDS, MixedPrecisionTrainer, warmup_cosine

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "data")
PRETRAIN_TEXT = "tragedies.txt"  # Hamlet, Lear, Macbeth, Othello (public domain)
FINETUNE_TEXT = "sonnets.txt"  # The Sonnets


class Corpus:
    """A byte text split 95/5 into train/validation; random windows from a seeded rng."""

    def __init__(self, name, seed, ctx, batch, device):
        with open(os.path.join(DATA, name), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        n = int(len(data) * 0.95)
        self.name, self.bytes = name, len(data)
        self.train, self.val = data[:n], data[n:]
        self.rng = np.random.default_rng(seed)
        self.ctx, self.batch, self.device = ctx, batch, device

    def _batch(self, data, rng):
        ix = rng.integers(0, len(data) - self.ctx - 1, size=self.batch)
        x = np.stack([data[i:i + self.ctx] for i in ix]).astype(np.int64)
        y = np.stack([data[i + 1:i + self.ctx + 1] for i in ix]).astype(np.int64)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def next_train(self):
        return self._batch(self.train, self.rng)

    def val_loss(self, trainer, n=4):
        rng = np.random.default_rng(1234)
        return float(np.mean([trainer.eval_loss(*self._batch(self.val, rng)) for _ in range(n)]))


def log(msg):
    print(msg, flush=True)


def new_trainer(args, preset, device):
    torch.manual_seed(args.seed)
    return MixedPrecisionTrainer(preset, args, device, args.seed)


def pretrain_lr(args, step):
    return warmup_cosine(step, args.lr, args.warmup, args.series_steps, args.min_lr_ratio)


def run_pretrain(args, preset, device, folder, total, save_at, mode):
    """Pretrain from the seed for `total` updates, saving after each update in `save_at`."""
    tr = new_trainer(args, preset, device)
    corpus = Corpus(PRETRAIN_TEXT, args.seed, preset.ctx, preset.batch, device)
    log(f"[{mode}] {tr.n_params():,} params, {len(tr.names)} tensors, {tr.optimizer_name}, "
        f"device {device}; val loss at init {corpus.val_loss(tr):.4f}")
    for s in range(1, total + 1):
        loss = tr.train_step(*corpus.next_train(), pretrain_lr(args, s))
        if s in save_at:
            path = tr.save(folder, "pretrain", s, pretrain_lr(args, s + 1), loss)
            log(f"[{mode}] step {s} loss {loss:.4f} lr {tr.lr:.3e} grad_norm {tr.grad_norm:.3f} "
                f"-> {path}")
    log(f"[{mode}] done, val loss {corpus.val_loss(tr):.4f}; {tr.save_seconds:.1f} s in saves")


def run_finetune(args, preset, device, folder, resume):
    tr = new_trainer(args, preset, device)
    meta = tr.load(resume)
    start = tr.step
    tr.freeze(preset.layers)
    n_frozen = sum(tr.masters[n].numel() for n in tr.frozen)
    corpus = Corpus(FINETUNE_TEXT, args.seed + 1, preset.ctx, preset.batch, device)
    ft_lr = lambda k: warmup_cosine(k, args.ft_lr, args.ft_warmup, args.ft_steps, args.min_lr_ratio)
    extra = {"resumed_from": os.path.basename(resume), "resume_step": start}
    log(f"[finetune] resumed {resume} at step {start}; {len(tr.frozen)} frozen tensors "
        f"({n_frozen:,} params); val loss on {FINETUNE_TEXT} {corpus.val_loss(tr):.4f}")
    tr.save(folder, "finetune", 0, ft_lr(1), float(meta["loss"]), extra)
    for k in range(1, args.ft_steps + 1):
        loss = tr.train_step(*corpus.next_train(), ft_lr(k))
        if k % args.ft_every == 0:
            path = tr.save(folder, "finetune", k, ft_lr(k + 1), loss, extra)
            log(f"[finetune] step {tr.step} loss {loss:.4f} lr {tr.lr:.3e} -> {path}")
    log(f"[finetune] done, val loss {corpus.val_loss(tr):.4f}; {tr.save_seconds:.1f} s in saves")


def run_modes(args, preset, device):
    out = args.out
    modes = ["pair", "series", "finetune"] if args.mode == "all" else [args.mode]
    times = {}
    for mode in modes:
        folder = os.path.join(out, mode)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        t0 = time.time()
        if mode == "pair":
            run_pretrain(args, preset, device, folder, args.pair_at + 1,
                         {args.pair_at, args.pair_at + 1}, mode)
        elif mode == "series":
            every = args.series_every
            run_pretrain(args, preset, device, folder, args.series_steps,
                         set(range(every, args.series_steps + 1, every)), mode)
        else:
            resume = args.resume or last_file(os.path.join(out, "series"))
            run_finetune(args, preset, device, folder, resume)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[mode] = time.time() - t0
        log(f"[{mode}] wall time {times[mode]:.1f} s")
    return times


def last_file(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) \
        if os.path.isdir(folder) else []
    if not files:
        raise SystemExit(f"no checkpoint in {folder}; run --mode series first or pass --resume")
    return os.path.join(folder, files[-1])


# ---------------------------------------------------------------------------- self-check


def self_check(summary):
    """Assertions on the summary of a small `all` run. Returns a list of failures."""
    fails = []
    for name in ("pair", "series", "finetune"):
        if name not in summary:
            fails.append(f"{name}: series missing")
    if fails:
        return fails
    counts = {"pair": 2, "series": 5, "finetune": 4}
    for name, res in summary.items():
        fails += res["errors"]  # layout, dtypes, metadata, RNE identity
        if len(res["files"]) != counts[name]:
            fails.append(f"{name}: {len(res['files'])} files, expected {counts[name]}")
        if any(f["rne_mismatches"] for f in res["files"]):
            fails.append(f"{name}: bf16 != RNE(master)")
    pair = summary["pair"]["pairs"][0]
    if pair["to"] != pair["from"] + 1:
        fails.append(f"pair: steps {pair['from']}->{pair['to']} are not one apart")
    for pr in summary["pair"]["pairs"] + summary["series"]["pairs"]:
        for k in KINDS:
            c, n = pr["all"][k]
            # measured with --self-check on CPU: >= 0.765 of bf16 and >= 0.98 of f32 elements
            # changed (the other 2 % are embedding rows of bytes absent from the text).
            if c < 0.38 * n:
                fails.append(f"{pr['from']}->{pr['to']}: only {c}/{n} {k} elements changed")
    for pr in summary["finetune"]["pairs"]:
        for k in KINDS:
            c, n = pr["frozen"][k]
            if n == 0 or c != 0:
                fails.append(f"finetune {pr['from']}->{pr['to']}: {c}/{n} frozen {k} changed")
            c, n = pr["trainable"]["optimizer.master"]
            if c < 0.5 * n:
                fails.append(f"finetune {pr['from']}->{pr['to']}: {c}/{n} trainable masters changed")
    rp = pair.get("replay")
    if rp is None:
        fails.append("pair: no AdamW replay measured")
    else:
        for k, r in rp.items():
            # measured with --self-check: within 4 ulp 1.0000 of exp_avg_sq and of master
            # on CPU (foreach), 0.9993-0.9994 and 0.9975 on an H200 (fused); allow 1 % off.
            if r["le4"] < 0.99 * r["n"]:
                fails.append(f"pair replay {k}: only {r['le4']}/{r['n']} within 4 ulp")
    rerun = summary["pair"].get("rerun")
    if rerun is None or rerun["differing"] != 0:
        fails.append(f"pair/series: the same seed did not reproduce bit for bit: {rerun}")
    return fails


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--mode", choices=["pair", "series", "finetune", "all"], default="all")
    ap.add_argument("--out", default="/var/tmp/bitsnap-megatron-series")
    ap.add_argument("--device", default="auto", help="auto (cuda if there), cpu or cuda")
    ap.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    ap.add_argument("--ctx", type=int, help="context length (default: the preset's)")
    ap.add_argument("--pair-at", type=int, default=100, help="warm-up updates before the pair")
    ap.add_argument("--series-steps", type=int, default=500,
                    help="pretrain length; also the cosine schedule's end for pair and series")
    ap.add_argument("--series-every", type=int, default=100)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--ft-every", type=int, default=50)
    ap.add_argument("--resume", help="finetune's start file (default: series/'s last)")
    ap.add_argument("--lr", type=float, default=6e-4, help="pretrain peak lr")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--ft-lr", type=float, default=6e-5, help="fine-tune peak lr")
    ap.add_argument("--ft-warmup", type=int, default=10)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                    help="let CUDA pick its fastest attention kernels (runs then differ in the "
                         "last bits); default: math attention, reproducible bit for bit")
    ap.add_argument("--self-check", action="store_true",
                    help="small run in a temp folder + assertions (CPU, about a minute)")
    ap.add_argument("--summary-json", help="also write the summary as JSON here")
    ap.add_argument("--keep", action="store_true", help="self-check: keep the temp folder")
    args = ap.parse_args()

    if args.self_check:
        args.preset, args.mode = "small", "all"
        args.pair_at, args.series_steps, args.series_every = 5, 25, 5
        args.ft_steps, args.ft_every, args.warmup, args.ft_warmup = 9, 3, 3, 2
        args.out = tempfile.mkdtemp(prefix="megatron-series-check-")
    base = PRESETS[args.preset]
    preset = Preset(base.layers, base.d_model, base.heads, args.ctx or base.ctx,
                    args.batch or base.batch)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"torch {torch.__version__}, preset {args.preset} {preset}, out {args.out}")

    t0 = time.time()
    times = run_modes(args, preset, device)
    t1 = time.time()
    summary = summarize(args.out, device)
    log(f"summary: {time.time() - t1:.1f} s; total {time.time() - t0:.1f} s; per mode: " +
        ", ".join(f"{m} {s:.1f} s" for m, s in times.items()))
    print_summary(summary)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"times": times, "series": summary}, f, indent=1)
    status = 1 if any(r["errors"] for r in summary.values()) else 0
    if args.self_check:
        fails = self_check(summary)
        for f in fails:
            log(f"FAIL {f}")
        log(f"self-check: {'FAILED' if fails else 'passed'} ({args.out})")
        if not args.keep:
            shutil.rmtree(args.out)
        status = 1 if fails else 0
    sys.exit(status)


if __name__ == "__main__":
    main()
