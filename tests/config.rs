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

#[test]
fn automerge_docs_per_org_from_file_env_and_flag() {
    let dir = tempfile::tempdir().expect("tmp");
    let get = |v: &toml::Value| v["gateway"]["automerge_docs_per_org"].as_integer();
    assert_eq!(get(&effective(dir.path(), &[], &[])), Some(10_000));
    std::fs::write(
        dir.path().join("ultrasync.toml"),
        "[gateway]\nautomerge_docs_per_org = 50\n",
    )
    .expect("write");
    assert_eq!(get(&effective(dir.path(), &[], &[])), Some(50));
    let env = [("ULTRASYNC_AUTOMERGE_DOCS_PER_ORG", "77")];
    assert_eq!(get(&effective(dir.path(), &[], &env)), Some(77));
    let flag = ["--automerge-docs-per-org", "9"];
    assert_eq!(get(&effective(dir.path(), &flag, &env)), Some(9));
    // Zero is refused, like every other bound.
    let err = run_fails(
        dir.path(),
        &["config"],
        &[("ULTRASYNC_AUTOMERGE_DOCS_PER_ORG", "0")],
    );
    assert!(err.contains("automerge_docs_per_org"), "{err}");
}

fn run_fails(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ultrasync"));
    cmd.current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ULTRASYNC_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ultrasync");
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_redacts_every_secret() {
    let dir = tempfile::tempdir().expect("tmp");
    let webhook_secret = "whsec-0123456789abcdef-private";
    let jwt_secret = "jwt-0123456789abcdef0123456789abcdef";
    let nats_password = "nats-password-from-the-environment";
    std::fs::write(
        dir.path().join("ultrasync.toml"),
        format!(
            "[auth]\njwt_secret_file = \"/run/secrets/jwt\"\n\
             [[webhooks]]\nname = \"w1\"\nurl = \"https://hooks.example.com/in\"\norg = \"acme\"\nsecret = \"{webhook_secret}\"\n"
        ),
    )
    .expect("write");
    let cfg = effective(
        dir.path(),
        &[],
        &[
            ("ULTRASYNC_JWT_SECRET", jwt_secret),
            ("ULTRASYNC_NATS_USER", "gateway"),
            ("ULTRASYNC_NATS_PASSWORD", nats_password),
        ],
    );
    let printed = toml::to_string(&cfg).expect("toml");
    for secret in [webhook_secret, jwt_secret, nats_password] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert_eq!(cfg["auth"]["jwt_secret"].as_str(), Some("<redacted>"));
    assert_eq!(cfg["nats_password"].as_str(), Some("<redacted>"));
    assert_eq!(cfg["webhooks"][0]["secret"].as_str(), Some("<redacted>"));
    // What is not secret still prints: paths to secret files, names, limits.
    assert_eq!(
        cfg["auth"]["jwt_secret_file"].as_str(),
        Some("/run/secrets/jwt")
    );
    assert_eq!(cfg["nats_user"].as_str(), Some("gateway"));
    assert_eq!(cfg["webhooks"][0]["name"].as_str(), Some("w1"));
    assert!(
        cfg["auth"]["max_token_lifetime_secs"]
            .as_integer()
            .is_some()
    );
}

#[test]
fn example_secrets_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    // The placeholders shipped in deploy/env/gateway.env.example.
    let err = run_fails(
        dir.path(),
        &["config"],
        &[(
            "ULTRASYNC_JWT_SECRET",
            "change-me-to-a-random-secret-of-at-least-32-bytes",
        )],
    );
    assert!(err.contains("placeholder"), "{err}");
    let err = run_fails(
        dir.path(),
        &["config"],
        &[
            ("ULTRASYNC_NATS_USER", "gateway"),
            ("ULTRASYNC_NATS_PASSWORD", "change-me-gateway-password"),
        ],
    );
    assert!(err.contains("nats_password"), "{err}");
}

#[test]
fn token_explains_that_public_key_deployments_mint_elsewhere() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("ultrasync.toml"),
        "[auth]\nalgorithm = \"EdDSA\"\npublic_key_file = \"/etc/ultrasync/jwt.pub\"\n",
    )
    .expect("write");
    let err = run_fails(dir.path(), &["token", "--org", "acme"], &[]);
    assert!(err.contains("issuer"), "{err}");
    // And an HS256 deployment refuses a lifetime its gateway would refuse.
    std::fs::write(
        dir.path().join("ultrasync.toml"),
        "[auth]\njwt_secret = \"jwt-0123456789abcdef0123456789abcdef\"\nmax_token_lifetime_secs = 3600\n",
    )
    .expect("write");
    let err = run_fails(dir.path(), &["token", "--org", "acme", "--ttl", "2h"], &[]);
    assert!(err.contains("max_token_lifetime_secs"), "{err}");
}
