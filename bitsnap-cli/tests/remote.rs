//! The `bitsnap` command line over `s3://` URLs, against a real S3-compatible server
//! (`s3s-fs`, started on 127.0.0.1; see `bitsnap-core/tests/common/s3.rs`, shared with
//! the library's S3 tests). Without `s3s-fs` the test fails when `CI` is set and is
//! skipped (with a note) otherwise.

#[path = "../../bitsnap-core/tests/common/mod.rs"]
mod common;
#[path = "../../bitsnap-core/tests/common/s3.rs"]
mod s3;

use std::process::Command;

use bitsnap_core::{DType, Role};
use common::{mutate, random_tensor};
use s3::{BUCKET, S3Server};

const BIN: &str = env!("CARGO_BIN_EXE_bitsnap");

#[test]
fn cli_packs_unpacks_and_verifies_a_series_on_s3() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let mut series = Vec::new();
    let mut t = random_tensor("layer.weight", DType::F32, &[512, 512], Role::Weight, 11);
    let bias = random_tensor("layer.bias", DType::BF16, &[512], Role::Weight, 12);
    for step in 0..3 {
        let path = files.path().join(format!("step-{step}.safetensors"));
        bitsnap_core::safetensors::write_file(&path, &[t.clone(), bias.clone()], &[]).unwrap();
        series.push((path, vec![t.clone(), bias.clone()]));
        t = mutate(&t, 5, 100 + step);
    }
    let url = server.url("cli/run");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .envs(server.env())
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bitsnap {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut pack = vec!["pack", url.as_str()];
    pack.extend(series.iter().map(|(p, _)| p.to_str().unwrap()));
    run(&pack);
    let ls: serde_json::Value = serde_json::from_str(&run(&["ls", &url, "--json"])).unwrap();
    let snaps = ls["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 3);
    assert!(snaps[0]["base_id"].is_null());
    assert_eq!(snaps[1]["base_id"], snaps[0]["id"], "a delta on S3 too");
    for (i, (_, tensors)) in series.iter().enumerate() {
        let out = files.path().join(format!("out-{i}.safetensors"));
        run(&["unpack", &url, &i.to_string(), "-o", out.to_str().unwrap()]);
        let (mut back, _) =
            bitsnap_core::safetensors::read_file(&out, |_| Some(Role::Weight)).unwrap();
        let mut want = tensors.clone();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, want, "snapshot {i} restores bit-exact");
    }
    let verify = run(&["verify", &url]);
    assert!(
        verify.contains("3 snapshots: 3 ok, 0 failed, 0 orphan files"),
        "{verify}"
    );

    // Reads check checksums: flip one payload byte on the server's disk.
    let file = snaps[2]["file"].as_str().unwrap();
    let on_disk = server.object_path("cli/run", file);
    let mut bytes = std::fs::read(&on_disk).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&on_disk, bytes).unwrap();
    let out = Command::new(BIN)
        .args(["verify", &url])
        .envs(server.env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains(&format!("s3://{BUCKET}/cli/run/{file}")),
        "{err}"
    );
}
