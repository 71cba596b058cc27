//! Each example's reduced run (`--smoke`), checked from the outside: exit status, the
//! summary it wrote, and the store it left on disk, read independently.

use std::path::Path;
use std::process::{Command, Output};

use bitsnap_core::Store;
use bitsnap_examples::finetune::Summary;

fn run(bin: &str, args: &[&str]) -> Output {
    let out = Command::new(bin)
        .args(args)
        // No BURN_DEVICE: the examples restore optimizer state onto the training device
        // themselves (`OptimizerSpec::init_on`), in this wgpu-enabled build too.
        .env_remove("BURN_DEVICE")
        .output()
        .expect("run the example");
    eprintln!(
        "{bin} {args:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn summary(dir: &Path) -> Summary {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json parses")
}

/// Every snapshot of the store in `dir` decodes (checksums included), and, given the
/// run's summary, it lists the store's snapshots and reports the files' sizes and the
/// decoded tensors' sizes; `note` is printed when the listing differs.
fn check_store(dir: &Path, summary: Option<&Summary>, note: &str) -> Store {
    let store = Store::open(dir).expect("open store");
    if let Some(s) = summary {
        let listed: Vec<&str> = s.store.snapshots.iter().map(|r| r.name.as_str()).collect();
        let stored: Vec<&str> = store.snapshots().iter().map(|i| i.name.as_str()).collect();
        let ids: Vec<(u64, Option<u64>)> =
            store.snapshots().iter().map(|i| (i.id, i.base)).collect();
        assert_eq!(
            listed,
            stored,
            "{}: the run's summary and the store list different snapshots (store ids and \
             bases: {ids:?})\n{note}",
            dir.display()
        );
    }
    let verify = store.verify().expect("verify");
    assert!(verify.failed.is_empty(), "{:?}", verify.failed);
    assert_eq!(verify.ok.len(), store.snapshots().len());
    let mut disk = 0;
    for (i, info) in store.snapshots().iter().enumerate() {
        let len = std::fs::metadata(dir.join(&info.file)).unwrap().len();
        let snap = store.load(info.id).expect("decode");
        let raw: u64 = snap.tensors.iter().map(|t| t.data.len() as u64).sum();
        assert_eq!(raw, info.raw_bytes, "{}", info.name);
        if let Some(s) = summary {
            let row = &s.store.snapshots[i];
            assert_eq!(
                (row.name.as_str(), row.file_bytes, row.raw_bytes),
                (info.name.as_str(), len, raw)
            );
        }
        disk += len;
    }
    if let Some(s) = summary {
        assert_eq!(s.store.disk_bytes, disk);
        assert!(s.store.ratio() > 1.0, "ratio {}", s.store.ratio());
    }
    store
}

fn model_tensors(store: &Store, name: &str) -> Vec<(String, Vec<u8>)> {
    let info = store.find("steps", name).expect("snapshot");
    let snap = store.load(info.id).unwrap();
    snap.tensors
        .into_iter()
        .filter(|t| t.name.starts_with("model/"))
        .map(|t| (t.name, t.data))
        .collect()
}

fn bits(s: &Summary) -> Vec<(u64, u32)> {
    s.losses.iter().map(|(st, l)| (*st, l.to_bits())).collect()
}

#[test]
fn finetune_gpt_resumes_exactly_after_a_simulated_crash_and_after_a_killed_process() {
    let bin = env!("CARGO_BIN_EXE_finetune-gpt");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    let arg = |p: &Path| p.to_str().unwrap().to_string();

    // Uninterrupted.
    assert!(
        run(
            bin,
            &[
                "--smoke",
                "--device",
                "cpu",
                "--no-crash",
                "--out",
                &arg(&a)
            ]
        )
        .status
        .success()
    );
    let sa = summary(&a);
    let total = sa.preset.total_steps();
    assert_eq!(sa.losses.len() as u64, total);
    assert!(sa.crash.is_none());
    assert_eq!(
        sa.timed_steps,
        total - bitsnap_examples::finetune::WARMUP_STEPS
    );
    assert!(sa.steps_per_s > 0.0 && sa.steps_per_s.is_finite());
    assert!(
        sa.eval_sonnets_after < sa.eval_sonnets_before,
        "fine-tuning did not help"
    );
    let (unchanged, frozen) = sa.frozen_unchanged;
    assert!(
        frozen > 0 && unchanged == frozen,
        "frozen tensors not stored unchanged: {unchanged}/{frozen}"
    );
    let png = std::fs::read(&sa.plot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "plot of {} bytes",
        png.len()
    );
    let store_a = check_store(&a.join("checkpoints"), Some(&sa), "");

    // Crash simulated in-process (the default): restored from disk, replayed exactly.
    assert!(
        run(bin, &["--smoke", "--device", "cpu", "--out", &arg(&b)])
            .status
            .success()
    );
    let sb = summary(&b);
    let crash = sb.crash.clone().expect("a crash");
    assert!(crash.simulated && !crash.from_memory);
    assert!(
        crash.replayed > 0 && crash.identical == crash.replayed,
        "{crash:?}"
    );
    assert_eq!(
        bits(&sb),
        bits(&sa),
        "resumed loss curve differs from the uninterrupted one"
    );
    let store_b = check_store(&b.join("checkpoints"), Some(&sb), "");
    let last = format!("step-{total}");
    assert!(
        model_tensors(&store_b, &last) == model_tensors(&store_a, &last),
        "final weights differ"
    );

    // A process killed mid-run (its queued save abandoned), then `--resume`.
    let stop = crash.crashed_after.to_string();
    let killed = run(
        bin,
        &[
            "--smoke",
            "--device",
            "cpu",
            "--stop-after",
            &stop,
            "--out",
            &arg(&c),
        ],
    );
    assert_eq!(killed.status.code(), Some(75));
    assert!(
        run(
            bin,
            &["--smoke", "--device", "cpu", "--resume", "--out", &arg(&c)]
        )
        .status
        .success()
    );
    let sc = summary(&c);
    let resumed = sc.crash.clone().expect("a resume");
    assert!(
        !resumed.simulated && resumed.identical == resumed.replayed,
        "{resumed:?}"
    );
    assert_eq!(
        bits(&sc),
        bits(&sa),
        "--resume loss curve differs from the uninterrupted one"
    );
    check_store(&c.join("checkpoints"), Some(&sc), "");

    // `--keeper`: a keeper process, a trainer SIGKILLed after the crash step, restarted
    // with `--resume`: restored from the keeper's memory, the same curve again.
    let keeper = run(
        bin,
        &[
            "--smoke",
            "--device",
            "cpu",
            "--keeper",
            "--snapshot-every",
            "1",
            "--crash-at",
            &stop,
            "--out",
            &arg(&d),
        ],
    );
    assert!(keeper.status.success());
    let stdout = String::from_utf8_lossy(&keeper.stdout);
    assert!(stdout.contains("killed the trainer (SIGKILL"), "{stdout}");
    let sd = summary(&d);
    let restart = sd.crash.clone().expect("a restart");
    assert!(
        !restart.simulated && restart.from_memory && restart.restored_from == "memory (keeper)",
        "{restart:?}"
    );
    assert!(
        restart.replayed <= 3 && restart.identical == restart.replayed,
        "{restart:?}"
    );
    assert_eq!(
        bits(&sd),
        bits(&sa),
        "the keeper-restored loss curve differs from the uninterrupted one"
    );
    // (A mismatch of the listing was seen once in CI, not reproduced in 900 runs under
    // load: the keeper demo's output says what the keeper persisted.)
    let note = format!("{stdout}\n{}", String::from_utf8_lossy(&keeper.stderr));
    check_store(&d.join("checkpoints"), Some(&sd), &note);
}

#[test]
fn finetune_gpt_compares_checkpointing_costs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_finetune-gpt"),
        &[
            "--smoke",
            "--device",
            "cpu",
            "--compare",
            "--compare-steps",
            "4",
            "--compare-warmup",
            "1",
            "--compare-every",
            "1,2",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let text = std::fs::read_to_string(tmp.path().join("speed.json")).unwrap();
    let report: bitsnap_examples::finetune::SpeedReport = serde_json::from_str(&text).unwrap();
    use bitsnap_examples::finetune::Saving;
    let labels: Vec<Saving> = report.rows.iter().map(|r| r.saving).collect();
    assert_eq!(
        labels,
        [
            Saving::None,
            Saving::Bitsnap { every: 1 },
            Saving::Burn { every: 1 },
            Saving::Bitsnap { every: 2 },
            Saving::Burn { every: 2 },
            Saving::None
        ]
    );
    for r in &report.rows {
        assert_eq!(r.steps, 4);
        assert!(r.seconds > 0.0);
        let want = match r.saving {
            Saving::None => 0,
            Saving::Bitsnap { every } | Saving::Burn { every } => 4 / every,
        };
        assert_eq!(r.checkpoints, want, "{r:?}");
    }
    // The scratch stores are removed after each configuration.
    assert_eq!(
        std::fs::read_dir(tmp.path().join("speed")).unwrap().count(),
        0
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("| bitsnap every 1 |"));
}

#[test]
fn learner_resumes_through_bitsnap_checkpointer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_learner"),
        &[
            "--smoke",
            "--epochs",
            "4",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("bit-identical"));
    let store = check_store(&tmp.path().join("checkpoints"), None, "");
    // KeepLastN(3) over epochs 1..=4: epochs 2, 3, 4 of model, optim and scheduler.
    let mut names: Vec<String> = store
        .snapshots()
        .iter()
        .map(|s| format!("{}/{}", s.series, s.name))
        .collect();
    names.sort();
    let want: Vec<String> = ["model", "optim", "scheduler"]
        .iter()
        .flat_map(|k| (2..=4).map(move |e| format!("{k}/epoch-{e}")))
        .collect();
    assert_eq!(names, want);
}

#[test]
fn custom_loop_restores_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_custom-loop"),
        &["--smoke", "--out", tmp.path().to_str().unwrap()],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("is bit-identical to"));
    let store = check_store(&tmp.path().join("checkpoints"), None, "");
    assert!(store.snapshots().len() >= 4);
}

#[test]
fn finetune_gpt_lossy_optimizer_quantizes_moments_and_resumes_close() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let args = [
        "--smoke",
        "--device",
        "cpu",
        "--policy",
        "lossy-optimizer",
        "--bits",
        "8",
        "--out",
        dir,
    ];
    assert!(
        run(env!("CARGO_BIN_EXE_finetune-gpt"), &args)
            .status
            .success()
    );
    let s = summary(tmp.path());
    assert!(
        s.store.codecs.get("cluster").is_some_and(|c| c.tensors > 0),
        "{:?}",
        s.store.codecs
    );
    assert!(s.store.weights.ratio() < s.store.optimizer.ratio());
    let crash = s.crash.clone().expect("a crash");
    eprintln!(
        "replayed losses: max relative difference {:e}",
        crash.max_rel_diff
    );
    // Measured 8.1e-7 (8-bit moments, this smoke run, dropout on and a shuffled loader);
    // the bound is 6x that.
    assert!(crash.replayed > 0 && crash.max_rel_diff < 5e-6, "{crash:?}");
    check_store(&tmp.path().join("checkpoints"), Some(&s), "");
}
