#!/usr/bin/env python3
"""Study: lossless size from conditioning on what the decoder already has (issue #12).

For the f32 tensors of a Megatron-layout series (masters, exp_avg, exp_avg_sq), measures the
bytes of byte planes + zstd-1 (one frame per plane per 1 MiB chunk, as bitsnap codes them)
for the baseline forms and for context-conditioned forms:

* ``planes``, ``xor``, ``int`` (zigzag integer difference): today's codecs; ``base`` =
  min(xor, planes) per tensor (the bench's baseline), ``now`` = min(xor, planes, int).
* ``sort:<key>/<form>``: the residual ``form`` with its elements stably sorted by a key the
  decoder knows before it decodes this tensor (the base's exponent, the exponent of another
  tensor of the same snapshot decoded earlier, the sign of the master's change). Sorting
  puts elements of one context class next to each other, so zstd's per-block entropy tables
  fit each class: it is what conditioning costs with an order-0 coder.
* ``rot/<form>``: the residual rotated left by one bit (sign to bit 0) before the planes.
* ``H0``/``Hctx``: order-0 entropy of each byte plane, unconditioned and conditioned on the
  key (bits per element), the bound an order-0 coder of that plane can reach.

Decoding order assumed for the context keys: exp_avg_sq (v) first (from its base), then the
master (w) against its base, then exp_avg (m) with v and w known.

Usage (numpy + zstandard)::

    /var/tmp/bitsnap-torch-venv/bin/python tools/megatron_series/study_context.py \\
        /var/tmp/predict-ms/series/step-*.safetensors

Prints, per role, the bytes of every form over the whole series (first file included: its
forms have no base; every candidate counted as per tensor min(now, candidate), as a policy
trying it beside today's codecs would get) and, with ``--entropy``, each key's order-0
entropy per byte plane (bits per element) unconditioned and conditioned on the key.

Measured (session 5, 2-core dev box, /var/tmp/predict-ms small preset, f32 tensors only),
gain over ``now`` per role:

=========================  ===============  ===============
form                       series (5 x 100)  fine-tune (4 x 50)
=========================  ===============  ===============
masters  split:eb/int      +2.70%           +1.94%
masters  sort:eb/int       +1.91%           +0.96%
masters  split:eb-estep    +1.08%           +0.91%
exp_avg  split:ev/planes   +0.32%           +0.38%
exp_avg  sort:ev+sdw       +0.19%           +0.32%
exp_avg_sq  rot/int        +0.29%           +0.20%
exp_avg_sq  split:eb/int   +0.11%           +0.04%
=========================  ===============  ===============

What bounds the rest: the conditional entropies are within 0.5-4% of the unconditioned
ones on the two low planes of every role (masters' int residual, series: H0 per plane
[7.84 7.86 6.95 0.77] bits, H|base exponent [7.81 7.83 6.59 0.51]; exp_avg planes
[7.86 7.86 7.83 2.84] vs H|exp(v) [7.81 7.81 7.78 2.60]; exp_avg_sq int [7.73 7.86 7.77
0.85] vs [7.63 7.81 7.72 0.79]): at 50-100 step intervals the two low bytes of every f32
element are fresh random mantissa, and no key the decoder has makes them predictable. A
3-term least-squares predictor of the masters' change from (m/sqrt(v) of base and new, w)
explains R^2 = 0.46 (fine-tune) and 0.09-0.47 (series) of its variance: 0.1-0.45 bits of
~21 per element. The split form was built as codec ``grouped`` (bitsnap-core
codec/grouped.rs, FORMAT.md 3.10).
"""

import argparse
import json
import struct
import sys
from collections import defaultdict

import numpy as np
import zstandard

CHUNK = 1 << 18  # f32 elements per chunk: 1 MiB, bitsnap's CHUNK_BYTES
ZSTD = zstandard.ZstdCompressor(level=1)


def load(path):
    """f32 tensors of a safetensors file as uint32 arrays, by name."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<u4").copy()
    return out


def role_of(name):
    for prefix, role in (
        ("optimizer.master.", "w"),
        ("optimizer.exp_avg_sq.", "v"),
        ("optimizer.exp_avg.", "m"),
        ("params.", "w"),
        ("opt.nu.", "v"),
        ("opt.mu.", "m"),
    ):
        if name.startswith(prefix):
            return role, name[len(prefix):]
    return None, name


def plane_bytes(u32):
    """Bytes of byte planes + zstd-1 per 1 MiB chunk (plane record overhead included)."""
    total = 0
    b = u32.view(np.uint8).reshape(-1, 4)
    for s in range(0, len(u32), CHUNK):
        part = b[s:s + CHUNK]
        total += 8 + 4
        for p in range(4):
            plane = np.ascontiguousarray(part[:, p])
            if plane.size and (plane == plane[0]).all():
                total += 5 + 1
                continue
            z = len(ZSTD.compress(plane.tobytes()))
            total += 5 + min(z, plane.size)
    return total


def entropy_bits(u32, key=None):
    """Order-0 entropy of each byte plane, in bits per element (conditioned on key)."""
    b = u32.view(np.uint8).reshape(-1, 4)
    n = len(u32)
    out = []
    for p in range(4):
        plane = b[:, p].astype(np.int64)
        if key is None:
            c = np.bincount(plane, minlength=256).astype(float)
            c = c[c > 0] / n
            out.append(float(-(c * np.log2(c)).sum()))
        else:
            joint = key.astype(np.int64) * 256 + plane
            _, cj = np.unique(joint, return_counts=True)
            _, ck = np.unique(key, return_counts=True)
            pj = cj / n
            pk = ck / n
            out.append(float(-(pj * np.log2(pj)).sum() + (pk * np.log2(pk)).sum()))
    return out


def zigzag(new, old):
    d = (new.astype(np.int64) - old.astype(np.int64)).astype(np.int32)
    return ((d << 1) ^ (d >> 31)).astype(np.uint32)


def exponent(u32):
    return ((u32 >> 23) & 0xFF).astype(np.int32)


def rot(u32):
    return ((u32 << 1) | (u32 >> 31)).astype(np.uint32)


def sorted_by(x, key):
    return x[np.argsort(key, kind="stable")]


def forms(role, new, old, ctx):
    """Bytes of each form of one tensor; ``ctx`` holds decoder-known tensors."""
    r = {}
    x = {"planes": new}
    if old is not None:
        x["xor"] = new ^ old
        x["int"] = zigzag(new, old)
    for f, v in x.items():
        r[f] = plane_bytes(v)
    r["base"] = min(r["planes"], r.get("xor", r["planes"]))
    r["now"] = min(r["planes"], r.get("xor", r["planes"]), r.get("int", r["planes"]))
    for f, v in x.items():
        r["rot/" + f] = plane_bytes(rot(v))
    keys = {}
    if old is not None:
        keys["eb"] = exponent(old)  # the base's exponent
    if role == "m" and "v" in ctx:
        ev = exponent(ctx["v"])
        keys["ev"] = ev
        if "dw_sign" in ctx:
            keys["ev+sdw"] = ev * 2 + ctx["dw_sign"]
            keys["sdw"] = ctx["dw_sign"]
    if role == "w" and old is not None and "v" in ctx and "m_old" in ctx:
        # the master's expected step in ulps: exponent of the base's m/sqrt(v) over its ulp
        m = ctx["m_old"].view(np.float32).astype(np.float64)
        v = ctx["v"].view(np.float32).astype(np.float64)
        step = np.abs(m) / (np.sqrt(v) + 1e-8) + 1e-30
        keys["eb-estep"] = np.clip(exponent(old) - np.floor(np.log2(step)).astype(np.int32), 0, 400)
    if role == "v" and old is not None:
        pass
    for kname, key in keys.items():
        for f, v in x.items():
            r[f"sort:{kname}/{f}"] = plane_bytes(sorted_by(v, key))
            r[f"split:{kname}/{f}"] = split_bytes(v, key)
    return r, x, keys


def split_bytes(x, key):
    """Bytes when each key class is coded as its own planes (own zstd frames), plus a
    class table (4 bytes per class)."""
    total = 0
    for k in np.unique(key):
        total += 4 + plane_bytes(x[key == k])
    return total


ALL_FORMS = [
    f"{a}{k}/{f}"
    for a in ("sort:", "split:")
    for k in ("eb", "ev", "ev+sdw", "sdw", "eb-estep")
    for f in ("planes", "xor", "int")
] + ["rot/planes", "rot/xor", "rot/int", "planes", "xor", "int"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--entropy", action="store_true", help="print per-plane entropies")
    args = ap.parse_args()
    totals = defaultdict(lambda: defaultdict(int))
    raw = defaultdict(int)
    ent = defaultdict(lambda: np.zeros(4))
    entc = defaultdict(lambda: np.zeros(4))
    nel = defaultdict(int)
    prev = None
    for path in args.files:
        cur = load(path)
        by = defaultdict(dict)
        for name, t in cur.items():
            role, p = role_of(name)
            if role:
                by[p][role] = t
        pby = defaultdict(dict)
        if prev is not None:
            for name, t in prev.items():
                role, p = role_of(name)
                if role:
                    pby[p][role] = t
        for p, ts in by.items():
            old = pby.get(p, {})
            ctx = {}
            for role in ("v", "w", "m"):
                if role not in ts:
                    continue
                new = ts[role]
                o = old.get(role)
                if role == "w" and "m" in old:
                    ctx["m_old"] = old["m"]
                r, x, keys = forms(role, new, o, ctx)
                # every candidate is tried beside today's codecs: per tensor min(now, form)
                for k in ALL_FORMS:
                    totals[role][k] += min(r["now"], r.get(k, r["now"]))
                for k in ("base", "now"):
                    totals[role][k] += r[k]
                raw[role] += new.nbytes
                if args.entropy:
                    best = "int" if "int" in x else "planes"
                    for kn, key in keys.items():
                        tag = f"{role}:{kn}/{best}"
                        ent[tag] += np.array(entropy_bits(x[best])) * len(new)
                        entc[tag] += np.array(entropy_bits(x[best], key)) * len(new)
                        nel[tag] += len(new)
                ctx[role] = new
                if role == "w" and o is not None:
                    ctx["dw_sign"] = (new.view(np.float32) < o.view(np.float32)).astype(np.int32)
        prev = cur
        print(f"done {path}", file=sys.stderr)
    for role in ("w", "m", "v"):
        t = totals[role]
        if not t:
            continue
        print(f"\n== {role}: raw {raw[role]:,} B, baseline {t['base']:,} ({raw[role]/t['base']:.3f}x), now {t['now']:,}")
        for k in sorted(t, key=lambda k: t[k]):
            print(f"  {k:24s} {t[k]:>14,}  vs now {t['now']/t[k]:.4f}x  vs base {t['base']/t[k]:.4f}x")
        for k, e in entc.items():
            if k.startswith(role + ":"):
                print(f"  {k}: H0 {np.round(ent[k]/nel[k], 3)}  H|key {np.round(e/nel[k], 3)}")
    allbase = sum(totals[r]["base"] for r in totals)
    allnow = sum(totals[r]["now"] for r in totals)
    print(f"\nf32 total: baseline {allbase:,}, now {allnow:,}")


if __name__ == "__main__":
    main()
