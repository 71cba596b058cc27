//! An `s3s-fs` server for the tests of stores on S3 (bitsnap-core's `remote.rs` and the
//! command line's): started on a free 127.0.0.1 port over a temporary directory.
//!
//! `s3s-fs` is found at `$BITSNAP_S3S_FS` or on `PATH`; `.ci/run` installs it. Without it
//! a test fails when [`bitsnap_core::ci::required`] and is skipped (with a note) otherwise.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsnap_core::backend::{Backend, ObjectBackend};

pub const BUCKET: &str = "bitsnap";
pub const ACCESS_KEY: &str = "bitsnap-test";
pub const SECRET_KEY: &str = "bitsnap-test-secret";

/// An `s3s-fs` server on a free 127.0.0.1 port over a temporary directory; killed on drop.
pub struct S3Server {
    child: Child,
    /// The directory the server serves (bucket directories and upload records).
    pub root: tempfile::TempDir,
    endpoint: String,
}

impl S3Server {
    /// Starts the server, or returns `None` (skip) when it is not installed outside CI.
    pub fn start() -> Option<S3Server> {
        let Some(bin) = find_s3s_fs() else {
            assert!(
                !bitsnap_core::ci::required(),
                "s3s-fs is not installed (CI must install it: `cargo install s3s-fs --locked`)"
            );
            eprintln!("note: s3s-fs not found on PATH; skipping this S3 test");
            return None;
        };
        let root = tempfile::tempdir().expect("server root");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let server = S3Server {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_access_key_id", ACCESS_KEY.into()),
            ("aws_secret_access_key", SECRET_KEY.into()),
            ("aws_region", "us-east-1".into()),
            ("aws_allow_http", "true".into()),
        ]
    }

    /// The `AWS_*` environment of a process using this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    pub fn backend(&self, prefix: &str) -> Arc<dyn Backend> {
        let opts = self.options();
        let opts: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Arc::new(ObjectBackend::from_url(&self.url(prefix), &opts).expect("backend"))
    }

    /// Where the server keeps object `name` of `prefix`.
    pub fn object_path(&self, prefix: &str, name: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(prefix).join(name)
    }

    /// Whether a multipart upload is under way: s3s-fs keeps its record (`.upload-…`) and
    /// parts (`.upload_id-…`) in the root until the upload is completed or aborted.
    pub fn upload_in_progress(&self) -> bool {
        std::fs::read_dir(self.root.path()).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(".upload"))
            })
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn find_s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BITSNAP_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}
