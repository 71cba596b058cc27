//! The decode budget: how many decoded bytes one restore may hold, checked against the
//! headers before anything is decoded (a 7 KB payload can declare a 64 GiB tensor).

use std::path::Path;

use crate::Error;
use crate::format::Header;

/// Decode budget used where the machine's memory cannot be read (no `/proc/meminfo`,
/// as on macOS and Windows): 8 GiB.
pub const FALLBACK_DECODE_BUDGET: u64 = 8 << 30;

/// The default decode budget: half of `MemTotal` in `/proc/meminfo` on Linux, else
/// [`FALLBACK_DECODE_BUDGET`].
///
/// ```
/// let budget = bitsnap_core::default_decode_budget();
/// assert!(budget >= 1 << 20);
/// ```
pub fn default_decode_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .map_or(FALLBACK_DECODE_BUDGET, |total| total / 2)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib.checked_mul(1024)?)
}

/// Fails with [`Error::Budget`] unless decoding `header` (of `file`) while `held` bytes
/// stay decoded (its base's state) fits `budget`; names the tensor that crosses it.
/// The stores run it on every file of a chain before decoding it; callers decoding a
/// [`SnapshotFile`](crate::format::SnapshotFile) themselves run it first.
///
/// ```
/// use bitsnap_core::format::Header;
/// let header = Header::default(); // no tensors: decodes to nothing
/// bitsnap_core::check_decode_budget(&header, 0, 1 << 20, "x.bsnap".as_ref()).unwrap();
/// ```
pub fn check_decode_budget(
    header: &Header,
    held: u64,
    budget: u64,
    file: &Path,
) -> Result<(), Error> {
    let mut needed = held;
    let mut crossing = None;
    for e in &header.entries {
        needed = needed.saturating_add(e.raw_len());
        if needed > budget && crossing.is_none() {
            crossing = Some(e.name.clone());
        }
    }
    match crossing {
        Some(tensor) => Err(Error::Budget {
            file: file.to_path_buf(),
            tensor,
            needed,
            budget,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Decision, Entry};
    use crate::{DType, Role, codec::CodecId};

    fn entry(name: &str, numel: u64) -> Entry {
        Entry {
            name: name.into(),
            dtype: DType::F32,
            role: Role::Weight,
            codec: CodecId::Planes,
            shape: vec![numel],
            offset: 0,
            len: 0,
            payload_hash: 0,
            raw_hash: 0,
            decision: Decision::default(),
            references: Vec::new(),
        }
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn budget_names_the_crossing_tensor() {
        let h = Header {
            entries: vec![entry("a", 100), entry("b", 100), entry("c", 100)],
            ..Header::default()
        };
        let p = Path::new("x.bsnap");
        assert!(check_decode_budget(&h, 0, 1200, p).is_ok());
        match check_decode_budget(&h, 100, 1200, p) {
            Err(Error::Budget {
                tensor,
                needed,
                budget,
                ..
            }) => {
                assert_eq!((tensor.as_str(), needed, budget), ("c", 1300, 1200));
            }
            other => panic!("{other:?}"),
        }
    }
}
