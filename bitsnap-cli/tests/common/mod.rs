//! Helpers of the command-line tests: running `bitsnap`, checking its exit and output,
//! and writing and reading safetensors files with the `safetensors` crate.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_bitsnap");

pub fn bitsnap<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run bitsnap")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts exit code `code` and a one-line `bitsnap: ...` message on stderr; returns it.
pub fn fails(o: Output, code: i32) -> String {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{err}",
        stdout(&o)
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("bitsnap: "), "{err:?}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

pub fn json(o: Output) -> Value {
    let s = ok(o);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

/// A tensor to write: name, dtype, shape, bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn t(name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> T {
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

pub fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

pub fn write_st(path: &Path, tensors: &[T], meta: Option<&[(&str, &str)]>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|x| {
            (
                x.name.clone(),
                TensorView::new(x.dtype, x.shape.clone(), &x.data).unwrap(),
            )
        })
        .collect();
    let meta: Option<HashMap<String, String>> = meta.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// Reads a safetensors file back: tensors by name, and metadata.
pub fn read_st(path: &Path) -> (HashMap<String, T>, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let x = t(&n, v.dtype(), v.shape(), v.data().to_vec());
            (n, x)
        })
        .collect();
    (tensors, meta.metadata().clone())
}

/// `bitsnap pack STORE FILES... EXTRA...`, asserting success; returns stdout.
pub fn pack(store: &Path, files: &[PathBuf], extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![OsStr::new("pack"), store.as_os_str()];
    args.extend(files.iter().map(|f| f.as_os_str()));
    args.extend(extra.iter().map(OsStr::new));
    ok(bitsnap(args))
}
