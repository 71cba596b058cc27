#!/usr/bin/env python3
"""For each checkpoint series folder, compare consecutive checkpoints (files sorted by
name) and print, per group, the fraction of elements whose value changed:

  f32   : bitwise change of the f32 tensor in step-N.safetensors
  bf16  : params -> bitwise change in step-N.bf16.safetensors;
          mu/nu  -> change after rounding the f32 value to bf16 (RNE) here
  p.bits: mean number of differing bits per f32 *param* element (XOR popcount,
          averaged over all elements of the subset, changed or not)

Rows: all tensors of a group, LayerNorm gains only (ln*.weight), and the tensors
frozen during fine-tuning (tok/pos embeddings + lower half of the blocks) vs the rest.
In the pretrain series the "ft-frozen" tensors are trained normally (shown for comparison).
"""
import argparse
import glob
import os
import sys

import ml_dtypes
import numpy as np
from safetensors import safe_open

SERIES = ["pretrain-1step", "pretrain-100step", "finetune-1step", "finetune-50step"]


def load(path):
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def is_ln_gain(name):
    last = name.split(".")
    return len(last) >= 2 and last[-2].startswith("ln") and last[-1] == "weight"


def is_ft_frozen(name, n_layer):
    if name.startswith(("tok_emb.", "pos_emb.")):
        return True
    for i in range(n_layer // 2):
        if name.startswith(f"blocks.{i}."):
            return True
    return False


class Acc:
    def __init__(self):
        self.n = self.f32 = self.bf16 = self.bits = 0

    def add(self, a32, b32, a16, b16):
        ua, ub = a32.view(np.uint32).ravel(), b32.view(np.uint32).ravel()
        x = ua ^ ub
        self.n += ua.size
        self.f32 += int(np.count_nonzero(x))
        self.bf16 += int(np.count_nonzero(a16.view(np.uint16) != b16.view(np.uint16)))
        self.bits += int(np.bitwise_count(x).sum(dtype=np.int64))

    def row(self):
        n = max(self.n, 1)
        return self.n, self.f32 / n, self.bf16 / n, self.bits / n


def analyze_pair(fa, fb):
    a, b = load(fa), load(fb)
    ab = load(fa.replace(".safetensors", ".bf16.safetensors"))
    bb = load(fb.replace(".safetensors", ".bf16.safetensors"))
    names = [k[len("params."):] for k in a if k.startswith("params.")]
    n_layer = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks."))
    # sanity: bf16 file == RNE(f32 params)
    for n in names:
        assert np.array_equal(ab["params." + n].view(np.uint16),
                              a["params." + n].astype(ml_dtypes.bfloat16).view(np.uint16)), n
    rows = {}
    for g, prefix in (("params", "params."), ("mu", "opt.mu."), ("nu", "opt.nu.")):
        for sub in ("all", "LN gains", "ft-frozen", "ft-trainable"):
            acc = Acc()
            for n in names:
                if sub == "LN gains" and not is_ln_gain(n):
                    continue
                if sub == "ft-frozen" and not is_ft_frozen(n, n_layer):
                    continue
                if sub == "ft-trainable" and is_ft_frozen(n, n_layer):
                    continue
                x, y = a[prefix + n], b[prefix + n]
                if g == "params":
                    x16, y16 = ab[prefix + n], bb[prefix + n]
                else:
                    x16, y16 = x.astype(ml_dtypes.bfloat16), y.astype(ml_dtypes.bfloat16)
                acc.add(x, y, x16, y16)
            rows[(g, sub)] = acc.row()
    return rows, int(a["opt.count"]), int(b["opt.count"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default="/var/tmp/bitsnap-series")
    args = ap.parse_args()
    for s in SERIES:
        d = os.path.join(args.root, s)
        files = sorted(f for f in glob.glob(os.path.join(d, "step-*.safetensors"))
                       if not f.endswith(".bf16.safetensors"))
        if len(files) < 2:
            print(f"## {s}: fewer than 2 checkpoints, skipped\n")
            continue
        print(f"## {s}\n")
        print("| pair | opt.count | subset | elements | params f32 | params bf16 | mu f32 | mu bf16 | nu f32 | nu bf16 | p.bits |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fa, fb in zip(files, files[1:]):
            rows, ca, cb = analyze_pair(fa, fb)
            pair = f"{os.path.basename(fa)[5:11]}→{os.path.basename(fb)[5:11]}"
            for sub in ("all", "LN gains", "ft-frozen", "ft-trainable"):
                n, pf, pb, bits = rows[("params", sub)]
                _, mf, mb, _ = rows[("mu", sub)]
                _, nf, nb, _ = rows[("nu", sub)]
                print(f"| {pair} | {ca}→{cb} | {sub} | {n} | {pf:.4f} | {pb:.4f} | {mf:.4f} | {mb:.4f} "
                      f"| {nf:.4f} | {nb:.4f} | {bits:.2f} |")
        print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
