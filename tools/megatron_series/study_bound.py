#!/usr/bin/env python3
"""Study: the most a per-element context coder can shrink a Megatron-layout series (#12).

Every bf16 model tensor is counted as free (it is RNE of its f32 master: codec ``cast``), and
every f32 tensor (master, exp_avg, exp_avg_sq) as the *smallest* of these per-element forms,
each byte plane coded at its empirical conditional entropy given a context the decoder has:

* ``planes`` of the values (no base), ``xor`` and ``int`` (zigzag integer difference) against
  the previous file's tensor;
* context of plane ``p``: the residual's next-higher byte plane of the same element (already
  decoded, planes are coded high to low) and the base element's exponent byte; for exp_avg
  also exp_avg_sq's exponent byte of the same snapshot (``--contexts`` picks the parts). Up
  to 2^24 contexts per plane, counted per tensor: their plug-in entropy *under*-states what
  any coder can reach (it does not pay for learning them), so it bounds every coder of these
  forms but is not reachable; ``--adaptive`` prints instead the code length of an adaptive
  arithmetic coder learning those contexts as it goes: reachable, by a coder far slower
  than zstd.

Compares it with the best per-tensor baseline the bench reports (``bitsnap bench``: per tensor
the smaller of XOR + byte planes + zstd-1 and planes + zstd-1, whole series, first file
included): the ratio printed is what such a coder gains over that baseline.

Measured (session 6, 2-core dev box, ``/var/tmp/predict-ms`` small preset; baselines from
``bitsnap bench``: fine-tune 50.19 MB, 100-step series 102.12 MB; bitsnap stores 44.33 MB =
1.13x and 89.02 MB = 1.15x), most any such coder could gain over the baseline:

====================================  ==================  =================
contexts                              fine-tune (4 x 50)  series (5 x 100)
====================================  ==================  =================
none (order 0 per plane), plug-in     1.140x              1.155x
none, adaptive                        1.136x              1.151x
base exponent (+ v for m), plug-in    1.160x              1.179x
base exponent (+ v for m), adaptive   1.137x              1.151x
+ higher plane, plug-in               1.399x              1.473x
+ higher plane, adaptive              1.130x              1.146x
====================================  ==================  =================

(adaptive: Dirichlet 0.5; 0.05 and 0.01 give less.) The plug-in figures with many contexts
are not reachable: the same contexts, learnt as a real adaptive coder must learn them, give
*less* than order 0. What a coder can reach over these forms is where bitsnap already is
(1.13x / 1.15x): at 50-100 updates apart the low 16-20 bits of every trained f32 element are
fresh, and the 1.25x (fine-tune) target is not available from per-element forms.

Usage (numpy + zstandard + torch, for lgamma)::

    /var/tmp/bitsnap-torch-venv/bin/python tools/megatron_series/study_bound.py \\
        [--adaptive] [--contexts none|higher,base,v] \\
        --baseline-bytes 50190000 /var/tmp/predict-ms/finetune/step-*.safetensors
"""

import argparse

import numpy as np
import torch

from study_context import exponent, load, role_of, zigzag


ALPHA = 0.5
ADAPTIVE = False
CONTEXTS = set()


def cond_entropy_bits(sym, ctx):
    """Bits of ``sym`` given ``ctx``, summed over the elements: the plug-in entropy, or
    with ``--adaptive`` the code length of an adaptive arithmetic coder with one
    Dirichlet(ALPHA)-smoothed count table per context (what such a coder reaches, learning
    included)."""
    n = len(sym)
    if n == 0:
        return 0.0
    joint = ctx.astype(np.int64) * 256 + sym.astype(np.int64)
    _, cj = np.unique(joint, return_counts=True)
    _, ck = np.unique(ctx, return_counts=True)
    if not ADAPTIVE:
        return float(-(cj * np.log2(cj / n)).sum() + (ck * np.log2(ck / n)).sum())
    lg = lambda x: torch.lgamma(torch.as_tensor(x, dtype=torch.float64)).sum().item()
    nats = (lg(ck + 256 * ALPHA) - len(ck) * lg(256 * ALPHA)
            - lg(cj + ALPHA) + len(cj) * lg(ALPHA))
    return nats / np.log(2)


def form_bits(x, extra):
    """Sum over the 4 byte planes of H(plane | higher plane, extra context), in bits."""
    b = x.view(np.uint8).reshape(-1, 4)
    total = 0.0
    for p in range(3, -1, -1):
        use = p < 3 and "higher" in CONTEXTS
        higher = b[:, p + 1].astype(np.int64) if use else np.zeros(len(x), np.int64)
        ctx = (extra.astype(np.int64) << 8) | higher
        total += cond_entropy_bits(b[:, p], ctx)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--adaptive", action="store_true",
                    help="adaptive coder code lengths instead of plug-in entropies")
    ap.add_argument("--contexts", default="higher,base,v",
                    help="context parts: higher (next plane), base (base exponent), v")
    ap.add_argument("--baseline-bytes", type=float, required=True,
                    help="the bench's best per-tensor baseline payload bytes of these files")
    args = ap.parse_args()
    global ADAPTIVE, CONTEXTS
    ADAPTIVE, CONTEXTS = args.adaptive, set(args.contexts.split(","))
    prev = None
    total_bits = 0.0
    per_role = {}
    for path in sorted(args.files):
        cur = load(path)
        by_param = {}
        for name, t in cur.items():
            role, param = role_of(name)
            if role is not None:
                by_param.setdefault(param, {})[role] = (name, t)
        file_bits = 0.0
        for param, roles in by_param.items():
            v_exp = exponent(roles["v"][1]) if "v" in roles else None
            for role, (name, new) in roles.items():
                old = prev.get(name) if prev is not None else None
                if old is not None and np.array_equal(old, new):
                    continue  # unchanged: zero bytes
                extra = [np.zeros(len(new), np.int64)]
                if old is not None and "base" in CONTEXTS:
                    extra.append(exponent(old))
                if role == "m" and v_exp is not None and "v" in CONTEXTS:
                    extra.append(v_exp)
                key = np.zeros(len(new), np.int64)
                for e in extra:
                    key = (key << 8) | e.astype(np.int64)
                cands = [form_bits(new, key)]
                if old is not None:
                    cands.append(form_bits(new ^ old, key))
                    cands.append(form_bits(zigzag(new, old), key))
                best = min(cands)
                file_bits += best
                per_role[role] = per_role.get(role, 0.0) + best
        print(f"{path}: bound {file_bits / 8 / 1e6:.2f} MB")
        total_bits += file_bits
        prev = cur
    bound = total_bits / 8
    print("per role (MB): " + ", ".join(f"{r} {b / 8 / 1e6:.2f}" for r, b in sorted(per_role.items())))
    print(f"bound {bound / 1e6:.2f} MB vs best baseline {args.baseline_bytes / 1e6:.2f} MB: "
          f"at most {args.baseline_bytes / bound:.3f}x")


if __name__ == "__main__":
    main()
