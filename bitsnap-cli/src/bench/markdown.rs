//! The benchmark report as markdown tables.

use std::fmt::Write as _;

use bitsnap_core::fmt::{Ratio, bytes};

use super::{BenchReport, Method};

/// Below this many raw bytes, the markdown tables show no speed: the time is mostly
/// thread start-up and allocation, not coding (the JSON still has it).
const MIN_TIMED_BYTES: u64 = 1_000_000;

fn fmt_fraction(f: Option<f64>) -> String {
    match f {
        None => "—".into(),
        Some(f) => format!("{:.3}%", f * 100.0),
    }
}

impl BenchReport {
    /// The report as markdown tables: totals per method, per file, per dtype and
    /// bitsnap per role.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "bitsnap bench: {} files, {} raw, {} rayon threads, bitsnap policy {}, zstd level {}",
            self.file_count,
            bytes(self.raw_bytes),
            self.threads,
            self.policy,
            self.zstd_level
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| method | what | stored | ratio | ratio on deltas | encode GB/s | decode GB/s |"
        )?;
        writeln!(s, "|---|---|---:|---:|---:|---:|---:|")?;
        for m in &self.methods {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                m.method,
                m.description,
                bytes(m.stored_bytes),
                Ratio(m.ratio),
                m.delta_ratio.map_or("—".into(), |r| Ratio(r).to_string()),
                m.encode_gbps,
                m.decode_gbps
            )?;
        }
        if let Some(w) = &self.whole_file_zstd {
            writeln!(
                s,
                "| zstd-1 whole files | each input file (header included) as one zstd frame | {} | {} | — | {:.2} | — |",
                bytes(w.stored_bytes),
                Ratio(w.ratio),
                w.encode_gbps
            )?;
        }
        if let Some(b) = &self.bitmask_bound {
            writeln!(
                s,
                "| bitmask bound | bits/(1 + bits·p): 1-bit mask + changed elements raw, no entropy coding | {} | — | {} | — | — |",
                bytes(b.bound_bytes),
                Ratio(b.ratio)
            )?;
        }
        writeln!(s)?;
        let b = &self.best_baseline;
        writeln!(
            s,
            "bitsnap vs the best per-tensor baseline (per tensor the smaller of xor and planes; whole series, first file included):"
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "| best baseline payloads | its ratio | bitsnap payloads | bitsnap smaller by | bitsnap files | files / baseline payloads |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|")?;
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.4}x ({} ≤ {}x) |",
            bytes(b.stored_bytes),
            Ratio(b.ratio),
            bytes(b.bitsnap_bytes),
            Ratio(b.bitsnap_gain),
            bytes(b.bitsnap_file_bytes),
            b.file_over_baseline,
            if b.files_within_limit { "ok" } else { "OVER" },
            super::run::MAX_FILE_OVER_BASELINE
        )?;
        writeln!(s)?;
        let codecs: Vec<String> = self
            .bitsnap_codec_bytes
            .iter()
            .map(|(c, n)| format!("{c} {}", bytes(*n)))
            .collect();
        writeln!(s, "bitsnap payload bytes per codec: {}", codecs.join(", "))?;
        let saved: Vec<String> = self
            .bitsnap_codec_saved
            .iter()
            .map(|(c, n)| {
                let sign = if *n < 0 { "-" } else { "" };
                format!("{c} {sign}{}", bytes(n.unsigned_abs()))
            })
            .collect();
        writeln!(
            s,
            "bytes saved per codec against the best candidate of another kind (references: vs codecs reading no other tensor; intdelta: vs xor/planes/bitmask/grouped; grouped: vs xor/planes/bitmask/intdelta): {}",
            saved.join(", ")
        )?;
        writeln!(s)?;
        writeln!(
            s,
            "Ratio per file (changed: elements differing from the previous file's tensor of the same name, dtype and shape):"
        )?;
        writeln!(s)?;
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        writeln!(
            s,
            "| # | file | raw | changed | {} | best baseline | bitsnap vs best | bitmask bound | bitsnap codecs |",
            names.join(" | ")
        )?;
        writeln!(
            s,
            "|---:|---|---:|---:|{}---:|---:|---:|---|",
            "---:|".repeat(names.len())
        )?;
        for f in &self.files {
            let ratios: Vec<String> = f
                .methods
                .iter()
                .map(|m| Ratio(m.ratio).to_string())
                .collect();
            let codecs: Vec<String> = f
                .bitsnap_codecs
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let bitsnap = f
                .methods
                .iter()
                .find(|m| m.method == Method::Bitsnap.name())
                .map_or(0, |m| m.stored_bytes);
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                f.index,
                f.name,
                bytes(f.raw_bytes),
                fmt_fraction(f.changed_fraction),
                ratios.join(" | "),
                Ratio(bitsnap_core::fmt::ratio(f.raw_bytes, f.best_baseline_bytes)),
                Ratio(bitsnap_core::fmt::ratio(f.best_baseline_bytes, bitsnap)),
                f.bitmask_bound
                    .as_ref()
                    .map_or("—".into(), |b| Ratio(b.ratio).to_string()),
                codecs.join(", "),
                if f.bitsnap_delta { "" } else { " (full)" }
            )?;
        }
        writeln!(s)?;
        writeln!(s, "Encode / decode GB/s per file:")?;
        writeln!(s)?;
        writeln!(s, "| # | file | {} |", names.join(" | "))?;
        writeln!(s, "|---:|---|{}", "---:|".repeat(names.len()))?;
        for f in &self.files {
            let cells: Vec<String> = f
                .methods
                .iter()
                .map(|m| format!("{:.2} / {:.2}", m.encode_gbps, m.decode_gbps))
                .collect();
            writeln!(s, "| {} | {} | {} |", f.index, f.name, cells.join(" | "))?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "Per dtype, over the series: ratio, encode / decode GB/s:"
        )?;
        writeln!(s)?;
        writeln!(s, "| dtype | tensors | raw | {} |", names.join(" | "))?;
        writeln!(s, "|---|---:|---:|{}", "---:|".repeat(names.len()))?;
        for d in &self.dtypes {
            let raw = d.methods.first().map_or(0, |m| m.raw_bytes);
            let cells: Vec<String> = d
                .methods
                .iter()
                .map(|m| {
                    if m.raw_bytes < MIN_TIMED_BYTES {
                        format!("{}, —", Ratio(m.ratio))
                    } else {
                        format!(
                            "{}, {:.2} / {:.2}",
                            Ratio(m.ratio),
                            m.encode_gbps,
                            m.decode_gbps
                        )
                    }
                })
                .collect();
            writeln!(
                s,
                "| {} | {} | {} | {} |",
                d.dtype,
                d.tensors,
                bytes(raw),
                cells.join(" | ")
            )?;
        }
        writeln!(s)?;
        writeln!(s, "bitsnap per role, over the series:")?;
        writeln!(s)?;
        writeln!(
            s,
            "| role | tensors | raw | stored | ratio | max rel. L2 error | max abs. error |"
        )?;
        writeln!(s, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &self.roles {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.role,
                r.tensors,
                bytes(r.raw_bytes),
                bytes(r.stored_bytes),
                Ratio(r.ratio),
                r.max_rel_l2
                    .map_or("lossless".into(), |e| format!("{e:.2e}")),
                r.max_abs.map_or("lossless".into(), |e| format!("{e:.2e}"))
            )?;
        }
        Ok(())
    }
}
