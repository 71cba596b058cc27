//! `bitsnap prune`, `rm`, `pin`, `unpin` and `compact` on a delta chain: after every
//! operation each kept snapshot unpacks bit-exact.

mod common;

use std::path::{Path, PathBuf};

use common::{bitsnap, f32s, fails, json, ok, pack, read_st, t, write_st};
use safetensors::Dtype;

/// Writes `n` files `step-K.safetensors` of a slowly changing weight.
fn series(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|k| {
            let w: Vec<f32> = (0..4096)
                .map(|i| (i as f32 * 0.1).sin() + if i % 50 < k { 0.5 } else { 0.0 })
                .collect();
            let path = dir.join(format!("step-{k}.safetensors"));
            write_st(&path, &[t("w", Dtype::F32, &[64, 64], f32s(w))], None);
            path
        })
        .collect()
}

/// Every snapshot `ls` lists unpacks to the file it was packed from.
fn all_bit_exact(store: &Path, files: &[PathBuf], tmp: &Path) -> Vec<String> {
    let ls = json(bitsnap([
        "ls".as_ref(),
        store.as_os_str(),
        "--json".as_ref(),
    ]));
    let mut names = Vec::new();
    for s in ls["snapshots"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap().to_string();
        let out = tmp.join(format!("{name}.out.safetensors"));
        ok(bitsnap([
            "unpack".as_ref(),
            store.as_os_str(),
            name.as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ]));
        let src = files
            .iter()
            .find(|f| f.file_stem().unwrap().to_string_lossy() == name)
            .unwrap();
        assert_eq!(read_st(&out).0, read_st(src).0, "{name}");
        names.push(name);
    }
    ok(bitsnap(["verify".as_ref(), store.as_os_str()]));
    names
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn prune_rm_pin_and_compact_keep_every_kept_snapshot_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let files = series(dir.path(), 8);
    let store = dir.path().join("store");
    pack(&store, &files, &["--full-every", "100"]);
    let s = store.as_os_str();

    // A dry run changes nothing.
    let plan = json(bitsnap([
        "prune".as_ref(),
        s,
        "--keep-last".as_ref(),
        "3".as_ref(),
        "--keep-every".as_ref(),
        "4".as_ref(),
        "--dry-run".as_ref(),
        "--json".as_ref(),
    ]));
    assert_eq!(ids(&plan["deleted"]), vec![1, 2, 3, 5]);
    assert_eq!(all_bit_exact(&store, &files, dir.path()).len(), 8);

    // Pin snapshot 0 (`step-0`, id 1): prune keeps it.
    let pinned = ok(bitsnap(["pin".as_ref(), s, "step-0".as_ref()]));
    assert!(
        pinned.contains("pinned snapshot 0 `step-0` (id 1)"),
        "{pinned}"
    );
    let done = json(bitsnap([
        "prune".as_ref(),
        s,
        "--keep-last".as_ref(),
        "3".as_ref(),
        "--keep-every".as_ref(),
        "4".as_ref(),
        "--json".as_ref(),
    ]));
    assert_eq!(ids(&done["kept"]), vec![1, 4, 6, 7, 8]);
    assert_eq!(ids(&done["deleted"]), vec![2, 3, 5]);
    // Every deleted one is in a kept chain: retired, nothing removed or re-encoded.
    assert_eq!(ids(&done["retired"]), vec![2, 3, 5]);
    assert!(ids(&done["removed"]).is_empty());
    assert_eq!(
        all_bit_exact(&store, &files, dir.path()),
        ["step-0", "step-3", "step-5", "step-6", "step-7"]
    );

    // rm refuses a pinned snapshot, then takes it once unpinned (by index).
    let err = fails(bitsnap(["rm".as_ref(), s, "0".as_ref()]), 1);
    assert!(err.contains("is pinned"), "{err}");
    ok(bitsnap(["unpin".as_ref(), s, "step-0".as_ref()]));
    let table = ok(bitsnap(["rm".as_ref(), s, "0".as_ref()]));
    assert!(table.contains("retired"), "{table}");
    assert_eq!(all_bit_exact(&store, &files, dir.path()).len(), 4);

    // Compact rewrites the deltas on retired bases; the retired files go.
    let c = json(bitsnap(["compact".as_ref(), s, "--json".as_ref()]));
    assert_eq!(ids(&c["removed"]), vec![1, 2, 3, 5]);
    assert_eq!(
        all_bit_exact(&store, &files, dir.path()),
        ["step-3", "step-5", "step-6", "step-7"]
    );
    let bsnaps = std::fs::read_dir(&store)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".bsnap")
        })
        .count();
    assert_eq!(bsnaps, 4);

    // rm of the latest: nothing reads it, its file goes at once.
    let last = json(bitsnap([
        "rm".as_ref(),
        s,
        "step-7".as_ref(),
        "--json".as_ref(),
    ]));
    assert_eq!(ids(&last["removed"]), vec![8]);
    assert_eq!(all_bit_exact(&store, &files, dir.path()).len(), 3);
}

#[test]
fn prune_without_a_rule_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let files = series(dir.path(), 2);
    let store = dir.path().join("store");
    pack(&store, &files, &[]);
    let err = fails(bitsnap(["prune".as_ref(), store.as_os_str()]), 2);
    assert!(err.contains("--keep-last"), "{err}");
}
