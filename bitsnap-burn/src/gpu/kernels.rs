//! The CubeCL kernels that finish a [`DeviceForm`](bitsnap_core::codec::DeviceForm) on a
//! GPU, and their launches. The only file of the crate with `unsafe`: kernel launches.
//!
//! Every buffer is viewed as 32-bit words; one unit of work writes one output word, so
//! elements narrower than a word (f16, bf16: two per word) never race. Element widths of
//! 1, 2 and 4 bytes are handled here (`width_bits` 8, 16, 32); everything a kernel reads
//! is padded to whole words by the caller.
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
                let code = field(codes, i, code_bits);
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
    // `numel` codes) and codebook entries those codes name, each checked on the CPU to be
    // below the codebook's length.
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
