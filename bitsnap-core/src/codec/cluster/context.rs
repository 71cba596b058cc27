//! Context coding of cluster codes: the codes of a tensor entropy-coded by rANS
//! ([`constriction`]), each code under the frequency table of its *context*, the scale
//! class of its row plus that of its column.
//!
//! Why: a moment's magnitude is structured by rows and columns (the gradient of a weight
//! matrix is a sum of outer products: an input feature with large activations makes its
//! whole column large, an output unit its row), so a code's distribution depends on
//! where it sits. The planes + zstd path codes every code of a tensor with one Huffman
//! table over bytes (and 3- and 6-bit codes straddle bytes, so it hardly entropy-codes
//! them). Measured on the JAX series of `tools/train_series` (3.3M parameters, Optax
//! AdamW; `pretrain-100step` steps 200 and 300 packed with `--policy lossy-optimizer`
//! at the default budget; bits
//! per element stored, planes + zstd only → with context coding): first moments 2.26 →
//! 2.08 (full snapshot) and 2.29 → 2.09 (delta), second moments 1.96 → 1.27 and 2.30 →
//! 1.31 (the delta's second moments then take 4-bit plain codebooks instead of 3-bit
//! ratio residuals: the policy tries wider widths while they shrink). Encoding runs at
//! ~210–230 M codes/s, decoding at ~310–360 M codes/s (2-core box, release, 16M skewed
//! codes of 8 to 256 entries; planes + zstd decodes ~4000 M/s): decoding is rANS's
//! sequential state update, one chunk per core, and each code's symbol is found by a
//! bucket table (`lookup.rs`; constriction's binary search decoded 180 M/s at 8 entries,
//! 89 M/s at 256).
//!
//! Section layout (after the codebook of a payload whose coding byte is
//! [`CODING_CONTEXT`]; all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | `cols`: u32, ≥ 1, divides the element count `n` (`rows = n / cols`) |
//! | 1 | `c`: contexts, 1 to [`MAX_CONTEXTS`] |
//! | 4 | `s`: length of the side tables' zstd frame |
//! | s | zstd frame of: when `c > 1`, `rows` row classes then `cols` column classes (u8 each, `< c`); then `c × k` frequency weights (u16; `k` the codebook size) |
//! | 4 | `m`: elements per chunk, ≥ 1 |
//! | … | `⌈n / m⌉` chunks: `w` (u32, words), then `w` u32 words of constriction's `DefaultAnsCoder` (32-bit words, 24-bit precision), symbols pushed last to first |
//!
//! Element `e` has context `min(row[e / cols] + col[e % cols], c − 1)` (0 when `c = 1`).
//! A context's model: weight `f_j` of symbol `j` becomes the 24-bit probability
//! `⌊f_j (2²⁴ − k) / Σf⌋ + 1`, the rounding remainder added to the first symbol of
//! largest weight; a context whose weights are all 0 has no model and no element may use
//! it. Integer arithmetic only, so every platform builds the same models.

use constriction::UnwrapInfallible;
use constriction::stream::Decode;
use constriction::stream::model::DefaultContiguousCategoricalEntropyModel as Model;
use constriction::stream::stack::DefaultAnsCoder;
use rayon::prelude::*;

use super::lookup::{Lookup, PRECISION};
use crate::codec::{CodecError, Cursor};

/// Payload coding byte: codes packed, in a chunk stream of planes sections.
pub const CODING_PLANES: u8 = 0;
/// Payload coding byte: codes context-coded (this module's section).
pub const CODING_CONTEXT: u8 = 1;
/// Most contexts a section may declare.
pub const MAX_CONTEXTS: usize = 16;
/// Most codebook entries a context-coded payload may have (codes of at most 8 bits).
pub const MAX_SYMBOLS: usize = 256;
/// Elements per chunk the encoder writes (each chunk is decoded on its own core).
pub const CHUNK_ELEMS: usize = 1 << 20;

/// Contexts the encoder uses with row and column classes (trying 4 and 8 as well gave
/// the same sizes on the JAX series, measured).
const CLASS_CONTEXTS: usize = MAX_CONTEXTS;

/// The context-coded section of `codes` (each `< mags.len()`, the codebook size), or
/// `None` when it cannot be written (more than [`MAX_SYMBOLS`] entries) or cannot be
/// shorter than `beat` bytes (the codes' empirical entropy in their contexts, a lower
/// bound on what rANS writes for them, is not). `mags[j]` is a non-negative scale of
/// entry `j` (its magnitude), which ranks rows and columns; `shape` the tensor's
/// dimensions (empty or 1-D: one context).
pub(crate) fn encode(
    codes: &[u16],
    mags: &[f64],
    shape: &[u64],
    level: i32,
    beat: usize,
) -> Result<Option<Vec<u8>>, CodecError> {
    let k = mags.len();
    let n = codes.len();
    if k == 0 || k > MAX_SYMBOLS || n == 0 {
        return Ok(None);
    }
    let cols = match shape {
        [.., last] if shape.len() >= 2 => usize::try_from(*last).unwrap_or(0),
        _ => 0,
    };
    let cols = if cols >= 1 && n.is_multiple_of(cols) && n / cols >= 2 {
        cols
    } else {
        n
    };
    // The section stores `cols` as a u32 (a row of over 4G codes keeps planes + zstd).
    if u32::try_from(cols).is_err() {
        return Ok(None);
    }
    // The cheaper of one context and row × column classes (one count of the codes
    // serves both: one context's counts are the classes' summed).
    let best = if cols < n {
        let stats = RowCol::measure(codes, mags, cols);
        let classes = Layout::classes(&stats, CLASS_CONTEXTS, codes, k);
        let single = classes.merged(n);
        if classes.cost_bits < single.cost_bits {
            classes
        } else {
            single
        }
    } else {
        Layout::single(cols, codes, k)
    };
    if best.entropy_bits / 8.0 >= beat as f64 {
        return Ok(None);
    }
    best.write(codes, level)
}

/// Decodes a context-coded section (`bytes`, starting at payload offset `at`) into `n`
/// codes, each checked to be `< k`.
pub(crate) fn decode(bytes: &[u8], at: usize, n: usize, k: usize) -> Result<Vec<u16>, CodecError> {
    let s = Section::parse(bytes, at, n, k)?;
    let tables = s.tables()?;
    let mut out: Vec<u16> = bytemuck::allocation::try_zeroed_vec(n)
        .map_err(|()| CodecError::alloc(2 * n as u64, "the codes"))?;
    out.par_chunks_mut(s.chunk_elems)
        .zip(s.chunks.par_iter())
        .enumerate()
        .try_for_each(|(c, (out, &(off, words)))| s.decode_chunk(&tables, c, out, off, words))?;
    Ok(out)
}

/// Checks a context-coded section for `n` codes of a `k`-entry codebook without
/// decoding anything or allocating what `n` decides: its fields, chunk table and the
/// size its side tables declare (the tables and the codes' words are checked when
/// decoded).
pub(crate) fn check(bytes: &[u8], at: usize, n: usize, k: usize) -> Result<(), CodecError> {
    Section::parse(bytes, at, n, k).map(|_| ())
}

/// Per-row and per-column mean squared magnitude, as log2.
struct RowCol {
    cols: usize,
    rows_log: Vec<f64>,
    cols_log: Vec<f64>,
}

impl RowCol {
    fn measure(codes: &[u16], mags: &[f64], cols: usize) -> RowCol {
        let sq: Vec<f64> = mags.iter().map(|m| m * m).collect();
        let rows_sum: Vec<f64> = codes
            .par_chunks(cols)
            .map(|r| r.iter().map(|&c| sq[c as usize]).sum())
            .collect();
        // Each column summed over the rows in order, blocks of columns in parallel: the
        // same sums on every run and thread count (a rayon fold's grouping follows work
        // stealing, and the classes are cut from these sums), in `cols` floats.
        let rows = codes.len() / cols;
        let per_task = cols.div_ceil(rayon::current_num_threads()).max(256);
        let mut cols_sum = vec![0.0f64; cols];
        cols_sum
            .par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(t, acc)| {
                let first = t * per_task;
                for r in 0..rows {
                    let row = &codes[r * cols + first..r * cols + first + acc.len()];
                    acc.iter_mut()
                        .zip(row)
                        .for_each(|(a, &c)| *a += sq[c as usize]);
                }
            });
        let log = |s: &f64, count: usize| (s / count as f64).max(f64::MIN_POSITIVE).log2();
        RowCol {
            cols,
            rows_log: rows_sum.iter().map(|s| log(s, cols)).collect(),
            cols_log: cols_sum.iter().map(|s| log(s, rows)).collect(),
        }
    }
}

/// The classes of `logs` (log2 scales) for `c` contexts: 0 at the 1st percentile, one
/// class per `step` octaves, at most `c − 1`.
fn classes(logs: &[f64], step: f64, c: usize) -> Vec<u8> {
    let lo = percentile(logs, 0.01);
    logs.iter()
        .map(|&l| (((l - lo) / step).floor().max(0.0) as usize).min(c - 1) as u8)
        .collect()
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// A choice of contexts for one tensor, its counts and its estimated size.
struct Layout {
    cols: usize,
    contexts: usize,
    row_class: Vec<u8>,
    col_class: Vec<u8>,
    /// `contexts × k` counts of the codes.
    counts: Vec<u64>,
    /// `contexts × k` weights.
    weights: Vec<u16>,
    /// The codes' empirical entropy in their contexts, in bits: what no static model
    /// per context can beat.
    entropy_bits: f64,
    /// `entropy_bits` plus the side tables before zstd.
    cost_bits: f64,
}

impl Layout {
    fn single(cols: usize, codes: &[u16], k: usize) -> Layout {
        Layout::counted(cols, 1, Vec::new(), Vec::new(), codes, k)
    }

    fn classes(stats: &RowCol, c: usize, codes: &[u16], k: usize) -> Layout {
        let spread = |l: &[f64]| percentile(l, 0.99) - percentile(l, 0.01);
        let step = ((spread(&stats.rows_log) + spread(&stats.cols_log)) / (c - 1) as f64).max(0.5);
        let row_class = classes(&stats.rows_log, step, c);
        let col_class = classes(&stats.cols_log, step, c);
        Layout::counted(stats.cols, c, row_class, col_class, codes, k)
    }

    /// This layout's counts in one context, for `n` codes.
    fn merged(&self, n: usize) -> Layout {
        let k = self.counts.len() / self.contexts;
        let mut counts = vec![0u64; k];
        for table in self.counts.chunks(k) {
            counts.iter_mut().zip(table).for_each(|(a, b)| *a += b);
        }
        Layout::from_counts(self.cols, 1, Vec::new(), Vec::new(), counts, n)
    }

    fn counted(
        cols: usize,
        contexts: usize,
        row_class: Vec<u8>,
        col_class: Vec<u8>,
        codes: &[u16],
        k: usize,
    ) -> Layout {
        let ctx = Contexts::new(cols, contexts, &row_class, &col_class);
        let counts = codes
            .par_chunks(CHUNK_ELEMS)
            .enumerate()
            .fold(
                || vec![0u64; contexts * k],
                |mut acc, (ci, chunk)| {
                    for (&code, x) in chunk.iter().zip(ctx.from(ci * CHUNK_ELEMS)) {
                        acc[x * k + code as usize] += 1;
                    }
                    acc
                },
            )
            .reduce(
                || vec![0u64; contexts * k],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        Layout::from_counts(cols, contexts, row_class, col_class, counts, codes.len())
    }

    /// The weights and estimated size of `counts` (`contexts × k`) for `n` codes.
    fn from_counts(
        cols: usize,
        contexts: usize,
        row_class: Vec<u8>,
        col_class: Vec<u8>,
        counts: Vec<u64>,
        n: usize,
    ) -> Layout {
        let k = counts.len() / contexts;
        let mut weights = Vec::with_capacity(contexts * k);
        let mut entropy_bits = 0.0;
        for table in counts.chunks(k) {
            let total: u64 = table.iter().sum();
            let max = table.iter().copied().max().unwrap_or(0);
            for &count in table {
                // Proportional, a used symbol never 0.
                let w = if count == 0 {
                    0
                } else {
                    ((count as u128 * u128::from(u16::MAX)).div_ceil(u128::from(max.max(1))))
                        .clamp(1, u128::from(u16::MAX)) as u16
                };
                weights.push(w);
                if count > 0 {
                    entropy_bits -= count as f64 * (count as f64 / total as f64).log2();
                }
            }
        }
        // Side tables, before zstd: class bytes and two bytes per weight.
        let side = if contexts > 1 { n / cols + cols } else { 0 } + 2 * contexts * k;
        Layout {
            cols,
            contexts,
            row_class,
            col_class,
            counts,
            weights,
            entropy_bits,
            cost_bits: entropy_bits + 8.0 * side as f64,
        }
    }

    /// The section, or `None` when its side tables do not fit the u32 length field.
    fn write(&self, codes: &[u16], level: i32) -> Result<Option<Vec<u8>>, CodecError> {
        let k = self.weights.len() / self.contexts;
        let models = models(&self.weights, k);
        let ctx = Contexts::new(self.cols, self.contexts, &self.row_class, &self.col_class);
        let chunks: Vec<Vec<u32>> = codes
            .par_chunks(CHUNK_ELEMS)
            .enumerate()
            .map(|(ci, chunk)| {
                let mut coder = DefaultAnsCoder::new();
                let contexts: Vec<usize> = ctx.from(ci * CHUNK_ELEMS).take(chunk.len()).collect();
                let symbols = chunk.iter().zip(contexts).map(|(&code, c)| {
                    // Every context an element falls in was counted, so has a model.
                    models[c].as_ref().map(|m| (code as usize, m)).ok_or(c)
                });
                coder.try_encode_symbols_reverse(symbols).map_err(|e| {
                    CodecError::new(0, format!("context coding of chunk {ci} failed: {e:?}"))
                })?;
                coder
                    .into_compressed()
                    .map_err(|_| CodecError::new(0, format!("context coding of chunk {ci} failed")))
            })
            .collect::<Result<_, _>>()?;
        let mut side = Vec::with_capacity(
            self.row_class.len() + self.col_class.len() + 2 * self.weights.len(),
        );
        if self.contexts > 1 {
            side.extend_from_slice(&self.row_class);
            side.extend_from_slice(&self.col_class);
        }
        self.weights
            .iter()
            .for_each(|w| side.extend_from_slice(&w.to_le_bytes()));
        let side = zstd::bulk::compress(&side, level)
            .map_err(|e| CodecError::new(0, format!("zstd of the context tables: {e}")))?;
        let words: usize = chunks.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(17 + side.len() + 4 * (words + chunks.len()));
        out.extend_from_slice(&(self.cols as u32).to_le_bytes());
        out.push(self.contexts as u8);
        let Ok(side_len) = u32::try_from(side.len()) else {
            return Ok(None);
        };
        out.extend_from_slice(&side_len.to_le_bytes());
        out.extend_from_slice(&side);
        out.extend_from_slice(&(CHUNK_ELEMS as u32).to_le_bytes());
        for c in &chunks {
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            c.iter()
                .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
        }
        Ok(Some(out))
    }
}

/// The context of each element.
struct Contexts<'a> {
    cols: usize,
    last: usize,
    rows: &'a [u8],
    cols_of: &'a [u8],
}

impl<'a> Contexts<'a> {
    /// `contexts` contexts over rows of `cols` elements, by the classes of rows and
    /// columns (ignored for one context).
    fn new(cols: usize, contexts: usize, rows: &'a [u8], cols_of: &'a [u8]) -> Contexts<'a> {
        Contexts {
            cols,
            last: contexts - 1,
            rows,
            cols_of,
        }
    }

    /// The contexts of elements `first ..`, in order (no division per element).
    fn from(&self, first: usize) -> impl Iterator<Item = usize> + '_ {
        let (mut r, mut c) = (first / self.cols, first % self.cols);
        let mut row = class(self.rows, r);
        std::iter::repeat_with(move || {
            if self.last == 0 {
                return 0;
            }
            let x = (row + class(self.cols_of, c)).min(self.last);
            c += 1;
            if c == self.cols {
                (r, c) = (r + 1, 0);
                row = class(self.rows, r);
            }
            x
        })
    }
}

fn class(classes: &[u8], i: usize) -> usize {
    classes.get(i).copied().unwrap_or(0) as usize
}

/// Each context's model from its `k` weights (`None` for a context of all-zero weights).
fn models(weights: &[u16], k: usize) -> Vec<Option<Model>> {
    weights
        .chunks(k)
        .map(|w| {
            let p = probabilities(w)?;
            Model::from_nonzero_fixed_point_probabilities(&p, false).ok()
        })
        .collect()
}

/// Each context's decoding model (the same distribution as [`models`]').
fn lookups(weights: &[u16], k: usize) -> Vec<Option<Lookup>> {
    weights
        .chunks(k)
        .map(|w| Lookup::new(&probabilities(w)?))
        .collect()
}

/// The fixed-point probabilities (at [`PRECISION`] bits) of one context's weights:
/// each symbol at least 1, the rest shared in proportion to the weights, what rounding
/// leaves to the heaviest symbol; `None` for all-zero weights or too many symbols.
fn probabilities(weights: &[u16]) -> Option<Vec<u32>> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 || weights.len() > MAX_SYMBOLS {
        return None;
    }
    let k = weights.len() as u64;
    let room = (1u64 << PRECISION) - k;
    let mut p: Vec<u32> = weights
        .iter()
        .map(|&w| (u64::from(w) * room / total) as u32 + 1)
        .collect();
    let sum: u64 = p.iter().map(|&x| u64::from(x)).sum();
    let top = weights
        .iter()
        .enumerate()
        .max_by_key(|&(i, &w)| (w, std::cmp::Reverse(i)))
        .map_or(0, |(i, _)| i);
    p[top] += ((1u64 << PRECISION) - sum) as u32;
    Some(p)
}

/// A parsed section: its contexts, the side tables' frame and the chunk table.
struct Section<'a> {
    cols: usize,
    contexts: usize,
    rows: usize,
    k: usize,
    /// The zstd frame of the side tables, at payload offset `frame_at`.
    frame: &'a [u8],
    frame_at: usize,
    chunk_elems: usize,
    /// Per chunk: offset into `words` and word count.
    chunks: Vec<(usize, usize)>,
    words_at: usize,
    words: &'a [u8],
}

/// The decoded side tables: classes and each context's model.
struct Tables {
    row_class: Vec<u8>,
    col_class: Vec<u8>,
    models: Vec<Option<Lookup>>,
}

impl<'a> Section<'a> {
    /// Parses the fields and the chunk table, and checks that the side tables' frame
    /// declares the size they must have; allocates nothing the element count decides
    /// (the tables are decompressed by [`Section::tables`]).
    fn parse(bytes: &'a [u8], at: usize, n: usize, k: usize) -> Result<Section<'a>, CodecError> {
        let err = |cur: &Cursor<'_>, why: String| CodecError::new(at + cur.offset(), why);
        let mut cur = Cursor::new(bytes);
        if k == 0 || k > MAX_SYMBOLS {
            return Err(err(
                &cur,
                format!(
                    "a context-coded payload with a codebook of {k} entries (1 to {MAX_SYMBOLS})"
                ),
            ));
        }
        let cols = cur.u32("context columns").map_err(|e| e.shifted(at))? as usize;
        if cols == 0 || (n > 0 && !n.is_multiple_of(cols)) || (n == 0 && cols != 1) {
            return Err(err(
                &cur,
                format!("{cols} columns do not divide {n} elements"),
            ));
        }
        let contexts = cur.u8("contexts").map_err(|e| e.shifted(at))? as usize;
        if contexts == 0 || contexts > MAX_CONTEXTS {
            return Err(err(
                &cur,
                format!("{contexts} contexts (1 to {MAX_CONTEXTS})"),
            ));
        }
        let side_len = cur.u32("context table length").map_err(|e| e.shifted(at))? as usize;
        let frame_at = at + cur.offset();
        let frame = cur
            .bytes(side_len, "context tables")
            .map_err(|e| e.shifted(at))?;
        let rows = n.checked_div(cols).unwrap_or(0);
        let section = Section {
            cols,
            contexts,
            rows,
            k,
            frame,
            frame_at,
            chunk_elems: 0,
            chunks: Vec::new(),
            words_at: 0,
            words: &[],
        };
        let expect = section.tables_len();
        match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(size)) if size == expect as u64 => {}
            Ok(Some(size)) => {
                return Err(CodecError::new(
                    frame_at,
                    format!("context tables of {size} bytes, {expect} expected"),
                ));
            }
            _ => {
                return Err(CodecError::new(
                    frame_at,
                    "context tables: not a zstd frame that declares its size".to_string(),
                ));
            }
        }
        let chunk_elems = cur.u32("elements per chunk").map_err(|e| e.shifted(at))? as usize;
        if chunk_elems == 0 {
            return Err(err(&cur, "0 elements per chunk".to_string()));
        }
        let count = n.div_ceil(chunk_elems);
        let mut chunks = crate::codec::alloc::with_capacity(
            count.min(cur.remaining() / 4 + 1),
            "the chunk table",
        )?;
        let words_at = cur.offset();
        for c in 0..count {
            let w = cur.u32("chunk words").map_err(|e| e.shifted(at))? as usize;
            let off = cur.offset();
            cur.bytes(w.saturating_mul(4), "chunk words").map_err(|e| {
                CodecError::new(at + off, format!("chunk {c} of {count}: {}", e.reason))
            })?;
            chunks.push((off - words_at, w));
        }
        cur.finish("context-coded codes")
            .map_err(|e| e.shifted(at))?;
        Ok(Section {
            chunk_elems,
            chunks,
            words_at: at + words_at,
            words: &bytes[words_at..],
            ..section
        })
    }

    /// Bytes the side tables decompress to.
    fn tables_len(&self) -> usize {
        let classes = if self.contexts > 1 {
            self.rows + self.cols
        } else {
            0
        };
        classes + 2 * self.contexts * self.k
    }

    /// Decompresses the side tables (into a fallibly allocated buffer) and checks them.
    fn tables(&self) -> Result<Tables, CodecError> {
        let expect = self.tables_len();
        let mut side = crate::codec::alloc::zeroed(expect, "the context tables")?;
        let got = zstd::bulk::decompress_to_buffer(self.frame, &mut side[..])
            .map_err(|e| CodecError::new(self.frame_at, format!("context tables: {e}")))?;
        if got != expect {
            return Err(CodecError::new(
                self.frame_at,
                format!("context tables of {got} bytes, {expect} expected"),
            ));
        }
        let classes = expect - 2 * self.contexts * self.k;
        let (class_bytes, weight_bytes) = side.split_at(classes);
        if let Some(i) = class_bytes
            .iter()
            .position(|&c| c as usize >= self.contexts)
        {
            let which = if i < self.rows {
                format!("row {i}")
            } else {
                format!("column {}", i - self.rows)
            };
            return Err(CodecError::new(
                self.frame_at,
                format!(
                    "class {} of {which} is past {} contexts",
                    class_bytes[i], self.contexts
                ),
            ));
        }
        let weights: Vec<u16> = weight_bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let split = classes.min(self.rows);
        Ok(Tables {
            row_class: class_bytes[..split].to_vec(),
            col_class: class_bytes[split..].to_vec(),
            models: lookups(&weights, self.k),
        })
    }

    fn decode_chunk(
        &self,
        tables: &Tables,
        c: usize,
        out: &mut [u16],
        off: usize,
        words: usize,
    ) -> Result<(), CodecError> {
        let at = self.words_at + off;
        let compressed: Vec<u32> = self.words[off..off + 4 * words]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut coder = DefaultAnsCoder::from_compressed(compressed)
            .map_err(|_| CodecError::new(at, format!("chunk {c}: its last word is 0")))?;
        let ctx = Contexts::new(
            self.cols,
            self.contexts,
            &tables.row_class,
            &tables.col_class,
        );
        let first = c * self.chunk_elems;
        for (i, (o, x)) in out.iter_mut().zip(ctx.from(first)).enumerate() {
            let m = tables.models[x].as_ref().ok_or_else(|| {
                CodecError::new(
                    at,
                    format!(
                        "element {} is in context {x}, which has no symbols",
                        first + i
                    ),
                )
            })?;
            *o = coder.decode_symbol(m).unwrap_infallible() as u16;
        }
        if !coder.is_empty() {
            return Err(CodecError::new(
                at,
                format!("chunk {c}: words left after its {} codes", out.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::Role;
    use crate::codec::{ClusterQuantizer, Codec, CodecId, EncodeInput, check, decode};
    use proptest::prelude::*;
    use rand::{RngExt, SeedableRng};

    /// Second-moment-like values of a `rows × cols` matrix whose scale is a row factor
    /// times a column factor (spanning decades), as gradients of a weight matrix give.
    fn structured(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        let r: Vec<f64> = (0..rows)
            .map(|_| 10f64.powf(rng.random::<f64>() * 4.0))
            .collect();
        let c: Vec<f64> = (0..cols)
            .map(|_| 10f64.powf(rng.random::<f64>() * 4.0))
            .collect();
        let mut out = Vec::with_capacity(rows * cols * 4);
        for ri in &r {
            for ci in &c {
                let x = ri * ci * 1e-12 * (0.5 + rng.random::<f64>());
                out.extend_from_slice(&(x as f32).to_le_bytes());
            }
        }
        out
    }

    fn codes_of(n: usize, k: usize, seed: u64) -> Vec<u16> {
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        // Skewed: most codes small, as in a moment's codebook.
        (0..n)
            .map(|_| ((rng.random::<f64>().powi(3) * k as f64) as usize).min(k - 1) as u16)
            .collect()
    }

    #[test]
    fn structured_second_moments_are_context_coded_and_smaller() {
        let (rows, cols) = (192, 256);
        let data = structured(rows, cols, 3);
        let q = ClusterQuantizer::new(crate::codec::QuantBits::B4);
        let with_shape = |shape: &'static [u64]| {
            q.encode(&EncodeInput {
                dtype: DType::F32,
                role: Role::OptimizerMoment(2),
                data: &data,
                shape,
                base: None,
            })
            .unwrap()
            .unwrap()
        };
        let flat = with_shape(&[]);
        let shaped = with_shape(&[192, 256]);
        assert_eq!(flat.payload[2], CODING_PLANES);
        assert_eq!(shaped.payload[2], CODING_CONTEXT);
        // Measured: 22 169 bytes planes-coded, 8 584 context-coded (0.39).
        let ratio = shaped.payload.len() as f64 / flat.payload.len() as f64;
        assert!(
            ratio < 0.5,
            "{} vs {}: {ratio}",
            shaped.payload.len(),
            flat.payload.len()
        );
        // Same codes, so the same decoded tensor, whichever way they are stored.
        let n = rows * cols;
        let decoded = decode(CodecId::Cluster, &shaped.payload, DType::F32, n, None).unwrap();
        assert_eq!(decoded, shaped.lossy.as_ref().unwrap().0);
        assert_eq!(decoded, flat.lossy.as_ref().unwrap().0);
        check(CodecId::Cluster, &shaped.payload, DType::F32, n).unwrap();
    }

    #[test]
    fn a_section_that_cannot_beat_the_planes_is_not_written() {
        let codes = codes_of(20_000, 16, 5);
        let mags: Vec<f64> = (0..16).map(f64::from).collect();
        let written = encode(&codes, &mags, &[100, 200], 3, usize::MAX)
            .unwrap()
            .unwrap();
        // 16 skewed symbols: at least ~3 bits a code, far above 1 000 bytes.
        assert!(written.len() > 5_000, "{}", written.len());
        assert_eq!(encode(&codes, &mags, &[100, 200], 3, 1_000).unwrap(), None);
    }

    proptest! {
        #[test]
        fn round_trips_any_codes_and_shape(
            k in 1usize..=256, rows in 1usize..40, cols in 1usize..300,
            flat in any::<bool>(), seed in any::<u64>(), level in 1i32..4) {
            let n = rows * cols;
            let codes = codes_of(n, k, seed);
            let mags: Vec<f64> = (0..k).map(|j| j as f64 * 0.5).collect();
            let shape = [rows as u64, cols as u64];
            let shape: &[u64] = if flat { &[] } else { &shape };
            let section = encode(&codes, &mags, shape, level, usize::MAX).unwrap().unwrap();
            super::check(&section, 0, n, k).unwrap();
            prop_assert_eq!(&super::decode(&section, 0, n, k).unwrap(), &codes);
            // The bound `encode` skips by is a lower bound: a section it would write is
            // written for any `beat` above its length.
            prop_assert_eq!(
                encode(&codes, &mags, shape, level, section.len() + 1).unwrap(),
                Some(section)
            );
        }

        #[test]
        fn a_damaged_section_is_an_error_or_codes_within_the_codebook(
            k in 2usize..=16, seed in any::<u64>(), at in any::<prop::sample::Index>(),
            byte in any::<u8>(), cut in any::<bool>()) {
            let (rows, cols) = (30, 70);
            let codes = codes_of(rows * cols, k, seed);
            let mags: Vec<f64> = (0..k).map(|j| j as f64).collect();
            let mut section = encode(&codes, &mags, &[rows as u64, cols as u64], 3, usize::MAX)
                .unwrap()
                .unwrap();
            let i = at.index(section.len());
            if cut {
                section.truncate(i);
            } else {
                section[i] ^= byte.max(1);
            }
            // Never a panic; what decodes is codes of the codebook.
            if let Ok(out) = super::decode(&section, 0, rows * cols, k) {
                prop_assert!(out.iter().all(|&c| (c as usize) < k));
            }
            if cut {
                prop_assert!(super::check(&section, 0, rows * cols, k).is_err());
            }
        }
    }

    /// A section written by the first encoder (4 contexts over 4 rows × 6 columns, a
    /// 3-entry codebook): every later reader decodes these bytes to these codes, whatever
    /// its zstd or encoder does (FORMAT.md 3.7.1 pins constriction's coder).
    #[test]
    fn a_pinned_section_decodes_to_its_codes() {
        let codes: Vec<u16> = vec![
            0, 1, 2, 0, 0, 0, 1, 0, 2, 2, 1, 0, 0, 1, 0, 0, 1, 2, 2, 2, 0, 0, 0, 1,
        ];
        let section: [u8; 68] = [
            6, 0, 0, 0, 4, 43, 0, 0, 0, 40, 181, 47, 253, 32, 34, 17, 1, 0, 0, 0, 0, 0, 1, 1, 2, 1,
            0, 1, 255, 255, 255, 255, 0, 0, 255, 255, 0, 128, 0, 128, 255, 255, 0, 0, 255, 255, 0,
            0, 0, 0, 0, 0, 0, 0, 16, 0, 2, 0, 0, 0, 222, 243, 8, 229, 166, 255, 15, 0,
        ];
        super::check(&section, 0, 24, 3).unwrap();
        assert_eq!(super::decode(&section, 0, 24, 3).unwrap(), codes);
        // Codes of a 2-entry codebook cannot index this one's tables.
        assert!(super::decode(&section, 0, 24, 2).is_err());
    }

    /// A section with its fields set by hand (one context, weights `w`, one chunk).
    fn section_by_hand(
        cols: u32,
        contexts: u8,
        side: &[u8],
        chunk_elems: u32,
        words: &[u32],
    ) -> Vec<u8> {
        let frame = zstd::bulk::compress(side, 1).unwrap();
        let mut out = cols.to_le_bytes().to_vec();
        out.push(contexts);
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&frame);
        out.extend_from_slice(&chunk_elems.to_le_bytes());
        out.extend_from_slice(&(words.len() as u32).to_le_bytes());
        words
            .iter()
            .for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
        out
    }

    #[test]
    fn hostile_sections_fail_naming_what_is_wrong() {
        let weights = |w: &[u16]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ok_side = weights(&[3, 1]);
        let cases: Vec<(Vec<u8>, usize, &str)> = vec![
            (section_by_hand(3, 1, &ok_side, 8, &[1]), 8, "do not divide"),
            (section_by_hand(0, 1, &ok_side, 8, &[1]), 8, "do not divide"),
            (section_by_hand(4, 0, &ok_side, 8, &[1]), 8, "0 contexts"),
            (section_by_hand(4, 17, &ok_side, 8, &[1]), 8, "17 contexts"),
            (
                section_by_hand(4, 1, &ok_side[..2], 8, &[1]),
                8,
                "context tables",
            ),
            (
                section_by_hand(4, 2, &[0, 0, 2, 0, 0, 0, 3, 0, 1, 0, 3, 0, 1, 0], 8, &[1]),
                8,
                "past 2 contexts",
            ),
            (
                section_by_hand(4, 1, &weights(&[0, 0]), 8, &[1]),
                8,
                "no symbols",
            ),
            (
                section_by_hand(4, 1, &ok_side, 0, &[1]),
                8,
                "0 elements per chunk",
            ),
            (
                section_by_hand(4, 1, &ok_side, 8, &[0]),
                8,
                "last word is 0",
            ),
            (
                section_by_hand(4, 1, &ok_side, 8, &[7, 7, 7, 7]),
                8,
                "words left",
            ),
            (section_by_hand(4, 1, &ok_side, 4, &[1]), 8, "chunk"),
        ];
        for (section, n, want) in cases {
            let err = super::decode(&section, 100, n, 2).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(err.offset >= 100, "{err}");
        }
        // A huge tensor of one column and 2 contexts would need 2^34 bytes of classes:
        // refused by the size its frame declares, before anything is allocated.
        let huge = section_by_hand(1, 2, &ok_side, u32::MAX, &[1, 1, 1, 1, 1]);
        let err = super::check(&huge, 0, 1 << 34, 2).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        let mut trailing = section_by_hand(4, 1, &ok_side, 8, &[1]);
        trailing.push(0);
        assert!(super::check(&trailing, 0, 8, 2).is_err());
        assert!(super::decode(&[], 0, 8, 300).is_err());
    }
}
