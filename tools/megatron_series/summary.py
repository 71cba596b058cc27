#!/usr/bin/env python3
"""Measure and check a folder of series written by megatron_series.py.

For each series (pair/, series/, finetune/; files sorted by name = training order):

* file sizes;
* the layout: exactly model./optimizer.master./optimizer.exp_avg./optimizer.exp_avg_sq.
  for every parameter, dtypes BF16/F32/F32/F32, equal shapes, the metadata keys;
* the RNE identity: every `model.<p>` equals round-to-nearest-even(`optimizer.master.<p>`),
  element for element, checked against an integer reference written here (not torch's cast);
* per tensor kind, the fraction of elements whose bits changed between consecutive files
  (in finetune/ split into frozen and trainable tensors);
* for consecutive files one update apart: how well AdamW's update rule, given the old
  state, the new exp_avg and the metadata, predicts the new exp_avg_sq and master
  (distance in units in the last place, fp32).

`python3 summary.py DIR` prints the tables; `check_series` is what the self-check asserts on.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open

from trainer import FORMAT, KINDS

SERIES = ("pair", "series", "finetune")
DTYPES = {"model": torch.bfloat16, "optimizer.master": torch.float32,
          "optimizer.exp_avg": torch.float32, "optimizer.exp_avg_sq": torch.float32}
META_KEYS = ("format", "phase", "step", "phase_step", "adam_step", "lr", "next_lr", "betas",
             "eps", "weight_decay", "no_weight_decay", "grad_clip", "grad_norm", "optimizer",
             "frozen", "loss", "preset", "seed")


def rne_bf16_bits(master):
    """bf16 bit patterns of an fp32 tensor, rounded to nearest, ties to even
    (integer arithmetic on the fp32 bits; valid for finite values)."""
    u = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def bits(t):
    """Bit patterns as int64 (non-negative), for exact comparison."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def load(path, device):
    with safe_open(path, framework="pt", device=str(device)) as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def param_names(tensors):
    return sorted(k[len("model."):] for k in tensors if k.startswith("model."))


def check_layout(path, meta, tensors):
    """Errors (strings) in one file's layout; empty when it is right."""
    errs = []
    names = param_names(tensors)
    want = {f"{k}.{n}" for k in KINDS for n in names}
    if set(tensors) != want:
        errs.append(f"{path}: unexpected tensors {sorted(set(tensors) ^ want)[:5]}")
    for n in names:
        shape = tensors["model." + n].shape
        for k in KINDS:
            t = tensors.get(f"{k}.{n}")
            if t is None:
                continue
            if t.dtype != DTYPES[k]:
                errs.append(f"{path}: {k}.{n} is {t.dtype}, expected {DTYPES[k]}")
            if t.shape != shape:
                errs.append(f"{path}: {k}.{n} has shape {tuple(t.shape)}, model has {tuple(shape)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        errs.append(f"{path}: metadata lacks {missing}")
    elif meta["format"] != FORMAT:
        errs.append(f"{path}: format {meta['format']!r}")
    return errs


def rne_mismatches(tensors):
    """Number of elements where model.<p> != RNE(optimizer.master.<p>), and of non-finite masters."""
    bad = nonfinite = 0
    for n in param_names(tensors):
        master = tensors["optimizer.master." + n]
        nonfinite += int((~torch.isfinite(master)).sum())
        bad += int((bits(tensors["model." + n]) != rne_bf16_bits(master)).sum())
    return bad, nonfinite


def changed(a, b, names):
    """Per kind: (changed elements, elements) between two files over the given parameters."""
    out = {}
    for k in KINDS:
        c = n_el = 0
        for n in names:
            x, y = a[f"{k}.{n}"], b[f"{k}.{n}"]
            c += int((bits(x) != bits(y)).sum())
            n_el += x.numel()
        out[k] = (c, n_el)
    return out


def ulp_distance(pred, actual):
    """|ordered-int(pred) - ordered-int(actual)| for fp32 tensors."""
    def ordered(t):
        i = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(pred) - ordered(actual)).abs()


def replay(meta0, a, meta1, b):
    """Predict exp_avg_sq and master of file b from file a, b's exp_avg and b's metadata
    (torch AdamW: decoupled decay, bias correction). Returns {kind: ulp distances}."""
    beta1, beta2 = json.loads(meta1["betas"])
    eps, wd, lr = float(meta1["eps"]), float(meta1["weight_decay"]), float(meta1["lr"])
    no_decay = set(json.loads(meta1["no_weight_decay"]))
    frozen = set(json.loads(meta1["frozen"]))
    t = int(meta1["adam_step"])
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    dist = {"optimizer.exp_avg_sq": [], "optimizer.master": []}
    for n in param_names(a):
        if n in frozen:
            continue
        m0, v0, w0 = (a[f"optimizer.{k}.{n}"] for k in ("exp_avg", "exp_avg_sq", "master"))
        m1, v1, w1 = (b[f"optimizer.{k}.{n}"] for k in ("exp_avg", "exp_avg_sq", "master"))
        g = (m1 - beta1 * m0) / (1.0 - beta1)
        v = beta2 * v0 + (1.0 - beta2) * g * g
        w = w0 * (1.0 - lr * (0.0 if n in no_decay else wd))
        w = w - (lr / bc1) * m1 / (v1.sqrt() / (bc2 ** 0.5) + eps)
        dist["optimizer.exp_avg_sq"].append(ulp_distance(v, v1).flatten())
        dist["optimizer.master"].append(ulp_distance(w, w1).flatten())
    return {k: torch.cat(v) for k, v in dist.items()}


def summarize_series(folder, device):
    """Check and measure one series folder. Returns a dict (JSON-able)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    res = {"folder": folder, "files": [], "pairs": [], "errors": []}
    prev = None
    for f in files:
        path = os.path.join(folder, f)
        meta, t = load(path, device)
        res["errors"] += check_layout(path, meta, t)
        bad, nonfinite = rne_mismatches(t)
        if bad or nonfinite:
            res["errors"].append(f"{path}: {bad} bf16 elements differ from RNE(master), "
                                 f"{nonfinite} non-finite masters")
        res["files"].append({"file": f, "bytes": os.path.getsize(path), "step": int(meta["step"]),
                             "lr": float(meta["lr"]), "loss": float(meta["loss"]),
                             "optimizer": meta["optimizer"], "rne_mismatches": bad})
        if prev is not None:
            pmeta, pt = prev
            names = param_names(t)
            frozen = set(json.loads(meta["frozen"]))
            pair = {"from": int(pmeta["step"]), "to": int(meta["step"]),
                    "all": changed(pt, t, names)}
            if frozen:
                pair["frozen"] = changed(pt, t, [n for n in names if n in frozen])
                pair["trainable"] = changed(pt, t, [n for n in names if n not in frozen])
            if int(meta["adam_step"]) == int(pmeta["adam_step"]) + 1:
                d = replay(pmeta, pt, meta, t)
                pair["replay"] = {k: {"n": v.numel(), "exact": int((v == 0).sum()),
                                      "le1": int((v <= 1).sum()), "le4": int((v <= 4).sum()),
                                      "max": int(v.max())} for k, v in d.items()}
            res["pairs"].append(pair)
        prev = (meta, t)
    res["n_params"] = sum(x.numel() for k, x in prev[1].items() if k.startswith("model.")) if prev else 0
    return res


def rerun_differences(out_dir, device):
    """pair/ and series/ both train from the same seed: where they hold the same step,
    count the elements that differ (0 = the run reproduces bit for bit). None if no
    common file."""
    pair, series = os.path.join(out_dir, "pair"), os.path.join(out_dir, "series")
    if not (os.path.isdir(pair) and os.path.isdir(series)):
        return None
    common = sorted(set(os.listdir(pair)) & set(os.listdir(series)))
    common = [f for f in common if f.endswith(".safetensors")]
    if not common:
        return None
    _, a = load(os.path.join(pair, common[0]), device)
    _, b = load(os.path.join(series, common[0]), device)
    c = changed(a, b, param_names(a))
    return {"file": common[0], "differing": sum(x for x, _ in c.values()),
            "elements": sum(n for _, n in c.values())}


def summarize(out_dir, device="cpu"):
    s = {name: summarize_series(os.path.join(out_dir, name), device)
         for name in SERIES if os.path.isdir(os.path.join(out_dir, name))}
    rerun = rerun_differences(out_dir, device)
    if rerun is not None:
        s["pair"]["rerun"] = rerun
    return s


def frac(cn):
    c, n = cn
    return f"{c / n:.4f}" if n else "-"


def print_summary(summary, file=sys.stdout):
    p = lambda *a: print(*a, file=file)
    for name, res in summary.items():
        total = sum(f["bytes"] for f in res["files"])
        p(f"\n### {name}: {len(res['files'])} files, {total:,} bytes, {res['n_params']:,} params\n")
        p("| file | bytes | step | lr | loss | bf16 == RNE(master) |")
        p("|---|---:|---:|---:|---:|---|")
        for f in res["files"]:
            p(f"| {f['file']} | {f['bytes']:,} | {f['step']} | {f['lr']:.3e} | {f['loss']:.4f} | "
              f"{'yes' if f['rne_mismatches'] == 0 else 'NO (%d)' % f['rne_mismatches']} |")
        p("\nFraction of elements whose bits changed:\n")
        p("| pair | subset | model bf16 | master f32 | exp_avg | exp_avg_sq |")
        p("|---|---|---:|---:|---:|---:|")
        for pr in res["pairs"]:
            for subset in ("all", "frozen", "trainable"):
                if subset in pr:
                    c = pr[subset]
                    p(f"| {pr['from']}→{pr['to']} | {subset} | " +
                      " | ".join(frac(c[k]) for k in KINDS) + " |")
        rp = [pr for pr in res["pairs"] if "replay" in pr]
        if rp:
            p("\nAdamW replay (predict from the old file + new exp_avg + metadata), "
              "fraction of elements within N ulp:\n")
            p("| pair | tensor | exact | ≤1 ulp | ≤4 ulp | max ulp |")
            p("|---|---|---:|---:|---:|---:|")
            for pr in rp:
                for k, r in pr["replay"].items():
                    p(f"| {pr['from']}→{pr['to']} | {k} | {r['exact'] / r['n']:.4f} | "
                      f"{r['le1'] / r['n']:.4f} | {r['le4'] / r['n']:.4f} | {r['max']} |")
        if "rerun" in res:
            r = res["rerun"]
            p(f"\nRe-run check: pair/{r['file']} vs series/{r['file']} (same seed, trained "
              f"twice): {r['differing']:,} of {r['elements']:,} elements differ")
        for e in res["errors"]:
            p(f"ERROR {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="the --out folder of megatron_series.py")
    ap.add_argument("--device", default="cpu", help="where to load tensors (cpu, cuda)")
    ap.add_argument("--json", help="also write the summary as JSON here")
    args = ap.parse_args()
    s = summarize(args.dir, args.device)
    print_summary(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    sys.exit(1 if any(r["errors"] for r in s.values()) else 0)


if __name__ == "__main__":
    main()
