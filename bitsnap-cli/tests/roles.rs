//! Tensor roles through the command line (issue #14.1): weights named like moments stay
//! lossless under `--policy lossy-optimizer`, optimizer state of real layouts is
//! quantized, and ambiguous guesses are refused until `--role` settles them.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;

use common::{T, bitsnap, f32s, fails, json, ok, pack, stderr, t, write_st};
use safetensors::Dtype;

/// Positive f32 values (valid first and second moments alike) for a `[64, 32]` tensor.
fn moment_like_values(seed: f32) -> Vec<u8> {
    f32s((0..64 * 32).map(|i| ((i as f32 * 0.37 + seed).sin().abs() + 1e-3) * 1e-4))
}

/// Role (and codec) of each tensor of snapshot 0, from `inspect --json`.
fn roles_and_codecs(store: &Path) -> HashMap<String, (String, String)> {
    let insp = json(bitsnap([
        OsStr::new("inspect"),
        store.as_os_str(),
        OsStr::new("0"),
        OsStr::new("--json"),
    ]));
    insp["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let s = |k: &str| x[k].as_str().unwrap().to_string();
            (s("name"), (s("role"), s("codec")))
        })
        .collect()
}

/// Issue #14.1: model weights whose names contain `v`, `m`, `mu` or `momentum` (T5, MoCo,
/// a VAE) were guessed moments and quantized by `--policy lossy-optimizer`. Real
/// optimizer-state layouts must still be recognised and quantized.
#[test]
fn lossy_pack_quantizes_optimizer_state_and_never_weights_named_like_moments() {
    let dir = tempfile::tempdir().unwrap();
    let weights = [
        "encoder.block.0.layer.0.SelfAttention.v.weight",
        "decoder.block.0.layer.1.EncDecAttention.v.weight",
        "momentum_encoder.layer1.0.conv1.weight",
        "encoder.mu.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ];
    let moments = [
        ("state.0.exp_avg", "moment1"),
        ("state.0.exp_avg_sq", "moment2"),
        (
            "optimizer.state.exp_avg.decoder.layers.0.mlp.fc1.weight",
            "moment1",
        ),
        (
            "optimizer.state.exp_avg_sq.decoder.layers.0.mlp.fc1.weight",
            "moment2",
        ),
        ("opt_state.0.mu.params.dense.kernel", "moment1"),
        ("opt_state.0.nu.params.dense.kernel", "moment2"),
        ("optim.7.momentum.moment_1", "moment1"),
        ("optim.7.momentum.moment_2", "moment2"),
    ];
    let mut tensors: Vec<T> = Vec::new();
    for (i, name) in weights
        .iter()
        .chain(moments.iter().map(|(n, _)| n))
        .enumerate()
    {
        tensors.push(t(name, Dtype::F32, &[64, 32], moment_like_values(i as f32)));
    }
    let file = dir.path().join("step-1.safetensors");
    write_st(&file, &tensors, None);
    let store = dir.path().join("store");
    let run = bitsnap([
        OsStr::new("pack"),
        store.as_os_str(),
        file.as_os_str(),
        OsStr::new("--policy"),
        OsStr::new("lossy-optimizer"),
    ]);
    let err = stderr(&run);
    ok(run);
    // What will be quantized is listed before encoding: every moment, no weight.
    for (name, role) in moments {
        assert!(err.contains(&format!("{role}  {name}")), "{name}: {err}");
    }
    for name in weights {
        assert!(!err.contains(&format!("  {name}  ")), "{name}: {err}");
    }
    assert!(err.contains("8 tensors guessed optimizer moments"), "{err}");
    assert!(err.contains("4 tensors with moment-like names"), "{err}");

    let got = roles_and_codecs(&store);
    for name in weights {
        let (role, codec) = &got[name];
        assert_eq!(
            (role.as_str(), codec == "cluster"),
            ("weight", false),
            "{name}"
        );
    }
    for (name, want) in moments {
        let (role, codec) = &got[name];
        assert_eq!((role.as_str(), codec.as_str()), (want, "cluster"), "{name}");
    }
}

/// A moment guessed only from a sibling weight of the same shape (`X.m` beside `X`) is
/// ambiguous: a lossy pack refuses it, writing nothing, until `--role` settles it.
#[test]
fn lossy_pack_refuses_ambiguous_moments_until_a_role_rule_says() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("step-1.safetensors");
    write_st(
        &file,
        &[
            t(
                "dense.kernel",
                Dtype::F32,
                &[64, 32],
                moment_like_values(0.0),
            ),
            t(
                "dense.kernel.m",
                Dtype::F32,
                &[64, 32],
                moment_like_values(1.0),
            ),
        ],
        None,
    );
    let store = dir.path().join("store");
    let lossy = ["--policy", "lossy-optimizer"];
    let mut args = vec![OsStr::new("pack"), store.as_os_str(), file.as_os_str()];
    args.extend(lossy.iter().map(OsStr::new));
    let msg = fails(bitsnap(&args), 2);
    assert!(
        msg.contains("`dense.kernel.m` (guessed moment1") && msg.contains("--role"),
        "{msg}"
    );
    assert!(!store.exists(), "nothing may be written");

    // Lossless, nothing is at stake: no refusal, the guess stands.
    pack(&store, std::slice::from_ref(&file), &[]);
    assert_eq!(roles_and_codecs(&store)["dense.kernel.m"].0, "moment1");

    for (rule, role, codec) in [
        (r"\.m$=moment1", "moment1", "cluster"),
        (r"\.m$=weight", "weight", "not cluster"),
    ] {
        let store = dir.path().join(format!("store-{role}"));
        let mut extra = lossy.to_vec();
        extra.extend(["--role", rule]);
        pack(&store, std::slice::from_ref(&file), &extra);
        let (got_role, got_codec) = &roles_and_codecs(&store)["dense.kernel.m"];
        let got_codec = if got_codec == "cluster" {
            "cluster"
        } else {
            "not cluster"
        };
        assert_eq!((got_role.as_str(), got_codec), (role, codec), "{rule}");
    }
}
