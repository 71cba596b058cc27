//! The CubeCL kernels that finish a [`DeviceForm`](bitsnap_core::codec::DeviceForm) on a
//! GPU, and their launches. The only file of the crate with `unsafe`: kernel launches.
//!
//! Every buffer is viewed as 32-bit words; one unit of work writes one output word (the
//! cast patch: one patched word), so elements narrower than a word (f16, bf16: two per
//! word) never race. Element widths of 1, 2 and 4 bytes are handled here (`width_bits` 8,
//! 16, 32); everything a kernel reads is padded to whole words by the caller.
#![allow(unsafe_code)]

use burn::cubecl;
use burn::cubecl::client::Client;
use burn::cubecl::prelude::*;
use burn::cubecl::server::Handle;

use bitsnap_core::codec::RANK_BLOCK;

/// Mask words per rank block.
const BLOCK_WORDS: u32 = (RANK_BLOCK / 32) as u32;

/// The `index`-th field of `bits` bits (8, 16 or 32; fields never straddle words).
#[cube]
fn field(buf: &[u32], index: u32, #[comptime] bits: u32) -> u32 {
    let per_word = comptime!(32 / bits);
    let word = buf[(index / per_word) as usize];
    if comptime!(bits == 32) {
        word
    } else {
        (word >> ((index % per_word) * bits)) & comptime!((1u32 << bits) - 1)
    }
}

/// Code `index` of a little-endian bit stream of `bits`-bit codes (2, 3, 4, 6, 8 or 16).
/// 3- and 6-bit codes may straddle two words: 32 codes fill exactly `bits` words, so the
/// code's first bit is found without multiplying `index` by `bits` (no overflow below
/// 2^32 elements), and a code running past its word takes its high bits from the next.
#[cube]
fn code(buf: &[u32], index: u32, #[comptime] bits: u32) -> u32 {
    if comptime!(32 % bits == 0) {
        field(buf, index, bits)
    } else {
        let in_group = (index % 32) * bits;
        let word = (index / 32) * bits + in_group / 32;
        let shift = in_group % 32;
        let mut v = buf[word as usize] >> shift;
        if shift + bits > 32 {
            v |= buf[(word + 1) as usize] << (32 - shift);
        }
        v & comptime!((1u32 << bits) - 1)
    }
}

/// bf16 bits of the f32 with bits `x`, rounded to nearest even; a NaN keeps its sign and
/// high payload bits and gets the quiet bit (the `half` crate's `bf16::from_f32`).
#[cube]
fn to_bf16(x: u32) -> u32 {
    let mut r = x >> 16;
    if (x & 0x7fff_ffff) > 0x7f80_0000 {
        r |= 0x40;
    } else if (x & 0x8000) != 0 && (x & 0x17fff) != 0 {
        r += 1;
    }
    r
}

/// f16 bits of the f32 with bits `x`, rounded to nearest even: overflow to ±Inf,
/// subnormal results rounded from the full mantissa, NaN quieted with its high payload
/// bits kept (the `half` crate's `f16::from_f32`).
#[cube]
fn to_f16(x: u32) -> u32 {
    let sign = (x >> 16) & 0x8000;
    let e = (x >> 23) & 0xff;
    let man = x & 0x007f_ffff;
    let mut r = sign;
    if e == 0xff {
        let mut nan = 0u32;
        if man != 0 {
            nan = 0x0200;
        }
        r = sign | 0x7c00 | nan | (man >> 13);
    } else if e >= 143 {
        // Exponent past f16's: infinity.
        r = sign | 0x7c00;
    } else if e <= 112 {
        // A subnormal f16 (or zero when even the rounding bit is out of reach).
        if e >= 102 {
            let m = man | 0x0080_0000;
            let shift = 126 - e;
            let round = 1u32 << (shift - 1);
            let mut h = m >> shift;
            if (m & round) != 0 && (m & (3 * round - 1)) != 0 {
                h += 1;
            }
            r = sign | h;
        }
    } else {
        r = sign | ((e - 112) << 10) | (man >> 13);
        if (man & 0x1000) != 0 && (man & 0x2fff) != 0 {
            r += 1;
        }
    }
    r
}

/// Half-precision cast of an f32 tensor, two elements per output word (the high half of
/// the last word is 0 for an odd element count).
#[cube(launch)]
fn cast_halves(source: &[u32], out: &mut [u32], numel: u32, #[comptime] bf16: bool) {
    let j = ABSOLUTE_POS;
    if j < out.len() {
        let i = j as u32 * 2;
        let mut word = 0u32;
        #[unroll]
        for s in 0..2u32 {
            if i + s < numel {
                let x = source[(i + s) as usize];
                let h = if comptime!(bf16) {
                    to_bf16(x)
                } else {
                    to_f16(x)
                };
                word |= h << (16 * s);
            }
        }
        out[j] = word;
    }
}

/// Writes the exceptions of a cast: word `words[k]` of `out` takes `values[k]` in the
/// lanes `lanes[k]` (each word is listed once, so no two units write the same word).
#[cube(launch)]
fn patch_words(words: &[u32], values: &[u32], lanes: &[u32], out: &mut [u32]) {
    let k = ABSOLUTE_POS;
    if k < words.len() {
        let w = words[k] as usize;
        let keep = lanes[k] ^ 0xffff_ffff;
        out[w] = (out[w] & keep) | (values[k] & lanes[k]);
    }
}

/// Integer delta: each lane of `width_bits` is `base + unzigzag(z)`, wrapping within the
/// lane.
#[cube(launch)]
fn add_lanes(base: &[u32], zigzag: &[u32], out: &mut [u32], #[comptime] width_bits: u32) {
    let j = ABSOLUTE_POS;
    if j < out.len() {
        let b = base[j];
        let z = zigzag[j];
        if comptime!(width_bits == 32) {
            out[j] = b + ((z >> 1) ^ (0u32 - (z & 1)));
        } else {
            let per_word = comptime!(32 / width_bits);
            let mask = comptime!((1u32 << width_bits) - 1);
            let mut word = 0u32;
            #[unroll]
            for s in 0..per_word {
                let shift = s * width_bits;
                let zl = (z >> shift) & mask;
                let d = (zl >> 1) ^ (0u32 - (zl & 1));
                word |= (((b >> shift) + d) & mask) << shift;
            }
            out[j] = word;
        }
    }
}

/// `out = base XOR delta`, word by word.
#[cube(launch)]
fn xor_words(base: &[u32], delta: &[u32], out: &mut [u32]) {
    let j = ABSOLUTE_POS;
    if j < out.len() {
        out[j] = base[j] ^ delta[j];
    }
}

/// Bitmask expansion: for each element whose mask bit is set, XOR the next changed value
/// (its rank among the set bits) into the base. The rank of a word's first element is its
/// block's running count (`ranks`, computed while the mask was entropy-decoded) plus the
/// popcounts of the block's earlier mask words.
#[cube(launch)]
fn scatter_changed(
    base: &[u32],
    mask: &[u32],
    ranks: &[u32],
    values: &[u32],
    out: &mut [u32],
    #[comptime] width_bits: u32,
) {
    let j = ABSOLUTE_POS;
    if j < out.len() {
        let per_word = comptime!(32 / width_bits);
        let mut word = base[j];
        let first = j as u32 * per_word;
        let mask_index = first / 32;
        let shift = first % 32;
        let mine = (mask[mask_index as usize] >> shift) & comptime!((1u32 << per_word) - 1);
        if mine != 0 {
            let block = first / comptime!(RANK_BLOCK as u32);
            let mut rank = ranks[block as usize];
            let mut k = block * BLOCK_WORDS;
            while k < mask_index {
                rank += u32::count_ones(mask[k as usize]);
                k += 1;
            }
            rank += u32::count_ones(mask[mask_index as usize] & ((1u32 << shift) - 1));
            #[unroll]
            for s in 0..per_word {
                if (mine >> s) & 1 == 1 {
                    word ^= field(values, rank, width_bits) << (s * width_bits);
                    rank += 1;
                }
            }
        }
        out[j] = word;
    }
}

/// Cluster dequantization: each element is the codebook entry its code names.
#[cube(launch)]
fn lookup_codes(
    codes: &[u32],
    codebook: &[u32],
    out: &mut [u32],
    numel: u32,
    #[comptime] width_bits: u32,
    #[comptime] code_bits: u32,
) {
    let j = ABSOLUTE_POS;
    if j < out.len() {
        let per_word = comptime!(32 / width_bits);
        let mut word = 0u32;
        #[unroll]
        for s in 0..per_word {
            let i = j as u32 * per_word + s;
            if i < numel {
                let code = code(codes, i, code_bits);
                word |= field(codebook, code, width_bits) << (s * width_bits);
            }
        }
        out[j] = word;
    }
}

/// A device buffer of `words` 32-bit words.
pub(super) struct Words {
    pub handle: Handle,
    pub words: usize,
}

/// Launch geometry for one unit per output word.
fn geometry(client: &Client, words: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, words);
    (
        cubecl::calculate_cube_count_elemwise(client, words, dim),
        dim,
    )
}

fn arg(w: &Words) -> BufferArg {
    // SAFETY: a kernel may touch `words` words of this buffer, and `words` is never more
    // than the handle's allocation: every `Words` is built by `super::CubeTarget`'s
    // `upload`/`empty` with at least `words * 4` bytes (or aliases such a buffer with the
    // same `words`). Within that bound each kernel below indexes only what its caller
    // sized (see the comment at each launch).
    unsafe { BufferArg::from_raw_parts(w.handle.clone(), w.words) }
}

/// `out = base ^ delta`; all three hold `out.words` words.
pub(super) fn xor(client: &Client, base: &Words, delta: &Words, out: &Words) {
    let (count, dim) = geometry(client, out.words);
    // Bounds: each unit reads and writes index `ABSOLUTE_POS < out.len()` of buffers at
    // least `out.words` long (checked by the caller), so no access is out of bounds.
    xor_words::launch(client, count, dim, arg(base), arg(delta), arg(out));
}

/// Expands a bitmask delta into `out`. `mask` covers every element of `out` (bits past the
/// last element 0), `ranks` every rank block, `values` every changed element.
pub(super) fn scatter(
    client: &Client,
    base: &Words,
    mask: &Words,
    ranks: &Words,
    values: &Words,
    out: &Words,
    width_bits: u32,
) {
    let (count, dim) = geometry(client, out.words);
    // Bounds: unit `j < out.words` reads base[j], mask words up to (j*per_word)/32 (the
    // caller sizes `mask` for all elements of `out`), ranks[(j*per_word)/RANK_BLOCK]
    // (sized for all blocks) and values up to the element's rank, which is below the
    // number of set bits, for which `values` is sized; the caller checks all three.
    scatter_changed::launch(
        client,
        count,
        dim,
        arg(base),
        arg(mask),
        arg(ranks),
        arg(values),
        arg(out),
        width_bits,
    );
}

/// Casts the f32 tensor `source` (`numel` words) into the half tensor `out`
/// (`numel.div_ceil(2)` words), bf16 or f16.
pub(super) fn cast(client: &Client, source: &Words, out: &Words, numel: u32, bf16: bool) {
    let (count, dim) = geometry(client, out.words);
    // Bounds: unit `j < out.words` reads source words `2j` and `2j + 1` only when below
    // `numel`, for which the caller sized `source`.
    cast_halves::launch(client, count, dim, arg(source), arg(out), numel, bf16);
}

/// Patches cast exceptions into `out`: `words`, `values` and `lanes` hold one record per
/// patched word (`words.words` records).
pub(super) fn patch(client: &Client, words: &Words, values: &Words, lanes: &Words, out: &Words) {
    let (count, dim) = geometry(client, words.words);
    // Bounds: unit `k < words.words` reads record `k` of three buffers of that many
    // words and writes word `words[k]` of `out`, which the CPU checked to be below
    // `out.words` (exception positions below the element count).
    patch_words::launch(
        client,
        count,
        dim,
        arg(words),
        arg(values),
        arg(lanes),
        arg(out),
    );
}

/// `out = base + unzigzag(zigzag)` lane by lane; all three hold `out.words` words.
pub(super) fn add(client: &Client, base: &Words, zigzag: &Words, out: &Words, width_bits: u32) {
    let (count, dim) = geometry(client, out.words);
    // Bounds: each unit reads and writes index `ABSOLUTE_POS < out.len()` of buffers at
    // least `out.words` long (checked by the caller).
    add_lanes::launch(
        client,
        count,
        dim,
        arg(base),
        arg(zigzag),
        arg(out),
        width_bits,
    );
}

/// Dequantizes `numel` codes of `code_bits` into `out` through `codebook`.
pub(super) fn lookup(
    client: &Client,
    codes: &Words,
    codebook: &Words,
    out: &Words,
    numel: u32,
    width_bits: u32,
    code_bits: u32,
) {
    let (count, dim) = geometry(client, out.words);
    // Bounds: unit `j` reads codes of elements below `numel` (the caller sizes `codes` for
    // `numel` codes: `(numel * code_bits).div_ceil(32)` words, so a straddling code's
    // second word is there) and codebook entries those codes name, each checked on the
    // CPU to be below the codebook's length.
    lookup_codes::launch(
        client,
        count,
        dim,
        arg(codes),
        arg(codebook),
        arg(out),
        numel,
        width_bits,
        code_bits,
    );
}
