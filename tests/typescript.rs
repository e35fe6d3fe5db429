//! The TypeScript SDK (`clients/typescript`) from `cargo test`: its unit tests (node's
//! test runner, the shared optimistic-apply vectors included), then the demo app in
//! headless Chromium (Playwright, two browser contexts as two users) against the real
//! `ultrasync dev` serving it at `/demo`, and the automerge-repo demo
//! (`/demo/automerge/`, an unmodified automerge-repo app on ultrasync's automerge-repo
//! endpoint) the same way. Node, the npm packages (from the lockfile)
//! and Debian's `chromium` come from `scripts/setup.sh`; the screenshots land in a
//! folder whose path the test prints.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ultrasync_shared::auth;

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript")
}

/// Runs a command in the SDK folder, echoing its output; panics when it fails.
fn run(program: &str, args: &[&str], envs: &[(&str, String)]) {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(sdk_dir())
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program} could not start ({e}); run scripts/setup.sh"));
    eprintln!(
        "{program} {} took {:.1} s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "{program} {} failed: {status}",
        args.join(" ")
    );
}

/// Installs the npm packages (when missing) and builds the SDK and the demo, once
/// for both tests.
fn build() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return;
    }
    if !sdk_dir().join("node_modules/.package-lock.json").is_file() {
        run("npm", &["ci", "--no-audit", "--no-fund"], &[]);
    }
    run("npm", &["run", "build"], &[]);
    *built = true;
}

#[test]
fn sdk_unit_tests_and_shared_vectors() {
    build();
    run("node", &["--test", "test/unit/"], &[]);
}

/// `ultrasync dev` in a temp folder, stopped with SIGTERM on drop.
struct Dev {
    child: Child,
    http: String,
    /// The `Automerge` link it printed.
    automerge: String,
    _dir: tempfile::TempDir,
    secret: Vec<u8>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev() -> Dev {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(["dev", "--nats-port", "0", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--demo-dir")
        .arg(sdk_dir().join("demo"))
        .current_dir(dir.path())
        .env_remove("ULTRASYNC_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("dev-stderr.log")).expect("log file"))
        .spawn()
        .expect("start ultrasync dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut http, mut demo, mut automerge) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The demo links come before the NATS line.
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["HTTP", url, ..] => http = Some((*url).to_owned()),
            ["Demo", url, ..] => demo = Some((*url).to_owned()),
            ["Automerge", url, ..] => automerge = Some((*url).to_owned()),
            ["NATS", ..] => break,
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let secret = std::fs::read_to_string(dir.path().join("data/dev-secret")).expect("dev secret");
    assert!(demo.is_some(), "ultrasync dev printed no Demo link");
    Dev {
        child,
        http: http.expect("HTTP URL printed"),
        automerge: automerge.expect("ultrasync dev printed no Automerge link"),
        _dir: dir,
        secret: secret.trim().as_bytes().to_vec(),
    }
}

/// Debian's chromium (or `ULTRASYNC_CHROMIUM`).
fn chromium() -> String {
    if let Ok(p) = std::env::var("ULTRASYNC_CHROMIUM") {
        return p;
    }
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p.display().to_string();
            }
        }
    }
    panic!("no chromium on PATH; run scripts/setup.sh (it installs Debian's chromium)");
}

#[test]
fn demo_in_headless_chromium() {
    let browser = chromium();
    build();
    let dev = start_dev();
    // The demo page is served, the built bundle with it.
    let token = |sub: &str| {
        auth::mint_hs256(
            &dev.secret,
            &auth::claims(
                sub,
                "dev",
                &["*"],
                "read write",
                3600,
                auth::DEFAULT_AUDIENCE,
            ),
        )
        .expect("token")
    };
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("typescript-demo-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    eprintln!("screenshots: {}", shots.display());
    run(
        "node",
        &["--test", "--test-concurrency=1", "test/browser/run.mjs"],
        &[
            ("ULTRASYNC_HTTP", dev.http.clone()),
            ("ULTRASYNC_TOKEN_ALICE", token("alice")),
            ("ULTRASYNC_TOKEN_BOB", token("bob")),
            ("ULTRASYNC_CHROMIUM", browser),
            ("ULTRASYNC_SCREENSHOTS", shots.display().to_string()),
        ],
    );
    let n = std::fs::read_dir(&shots).map_or(0, |d| d.count());
    assert!(n >= 8, "expected the screenshots in {}", shots.display());
    eprintln!("{n} screenshots in {}", shots.display());
}

#[test]
fn automerge_repo_demo_in_headless_chromium() {
    let browser = chromium();
    build();
    let dev = start_dev();
    assert!(
        dev.automerge.contains("/demo/automerge/#token="),
        "{}",
        dev.automerge
    );
    let token = |sub: &str| {
        auth::mint_hs256(
            &dev.secret,
            &auth::claims(
                sub,
                "dev",
                &["*"],
                "read write",
                3600,
                auth::DEFAULT_AUDIENCE,
            ),
        )
        .expect("token")
    };
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("automerge-demo-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    eprintln!("screenshots: {}", shots.display());
    run(
        "node",
        &["--test", "test/browser/automerge.mjs"],
        &[
            ("ULTRASYNC_AUTOMERGE_DEMO", dev.automerge.clone()),
            ("ULTRASYNC_HTTP", dev.http.clone()),
            ("ULTRASYNC_TOKEN_ALICE", token("alice")),
            ("ULTRASYNC_TOKEN_BOB", token("bob")),
            ("ULTRASYNC_CHROMIUM", browser),
            ("ULTRASYNC_SCREENSHOTS", shots.display().to_string()),
        ],
    );
    let n = std::fs::read_dir(&shots).map_or(0, |d| d.count());
    assert!(n >= 3, "expected the screenshots in {}", shots.display());
}
