//! Configuration precedence, through the real binary: flags > `ULTRASYNC_*`
//! environment > `ultrasync.toml` > defaults.

use std::process::Command;

fn effective(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> toml::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ultrasync"));
    cmd.current_dir(dir).args(args).arg("config");
    for (k, _) in std::env::vars() {
        if k.starts_with("ULTRASYNC_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ultrasync config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("toml")
}

fn nats_url(v: &toml::Value) -> &str {
    v["nats_url"].as_str().expect("nats_url")
}

#[test]
fn flags_beat_env_beat_file_beat_defaults() {
    let dir = tempfile::tempdir().expect("tmp");
    let defaults = effective(dir.path(), &[], &[]);
    assert_eq!(nats_url(&defaults), "nats://127.0.0.1:4222");
    assert_eq!(
        defaults["sequencer"]["batch_window_ms"].as_integer(),
        Some(0)
    );

    std::fs::write(
        dir.path().join("ultrasync.toml"),
        "nats_url = \"nats://file:4222\"\n[sequencer]\nbatch_window_ms = 7\n",
    )
    .expect("write");
    let file = effective(dir.path(), &[], &[]);
    assert_eq!(nats_url(&file), "nats://file:4222");
    assert_eq!(file["sequencer"]["batch_window_ms"].as_integer(), Some(7));

    let env = effective(
        dir.path(),
        &[],
        &[("ULTRASYNC_NATS_URL", "nats://env:4222")],
    );
    assert_eq!(nats_url(&env), "nats://env:4222");
    assert_eq!(
        env["sequencer"]["batch_window_ms"].as_integer(),
        Some(7),
        "the file still fills the rest"
    );

    let flag = effective(
        dir.path(),
        &["--nats-url", "nats://flag:4222"],
        &[("ULTRASYNC_NATS_URL", "nats://env:4222")],
    );
    assert_eq!(nats_url(&flag), "nats://flag:4222");

    // Secrets never print.
    let secret = effective(
        dir.path(),
        &[],
        &[("ULTRASYNC_JWT_SECRET", "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t")],
    );
    assert_eq!(secret["auth"]["jwt_secret"].as_str(), Some("<redacted>"));

    // A bad file is an error that names the problem, not a silent default.
    std::fs::write(dir.path().join("ultrasync.toml"), "nats_ur = \"x\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .current_dir(dir.path())
        .arg("config")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nats_ur"));
}
