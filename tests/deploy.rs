//! The static deploy artifacts under `deploy/`: the compose file, the Helm chart, the
//! Dockerfile and the env files, checked for structure without Docker, Kubernetes or
//! Helm. `docker-compose config` (Debian's docker-compose, installed by
//! `scripts/setup.sh`) validates the compose file; it needs no Docker engine. Helm
//! templates are not rendered (no helm here): they are checked textually. The NATS
//! configs run: `deploy/init-env.sh` on a copy writes their secrets and certificates,
//! and the cluster configs, moved to loopback, form a TLS cluster (a real nats-server).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Parses a YAML file with anchors, aliases and `<<` merge keys resolved.
fn yaml(path: &Path) -> Value {
    let mut v: Value = serde_yaml::from_str(&read(path))
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    v.apply_merge()
        .unwrap_or_else(|e| panic!("merge keys in {}: {e}", path.display()));
    v
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|x| x.as_str().expect("a list of strings").to_owned())
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// `KEY=value` lines of an env file.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=value: {l}", path.display()));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Lines of a NATS config without comments.
fn conf_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

fn has_sync_always(text: &str) -> bool {
    conf_lines(text).any(|l| {
        let l = l.replace([':', '=', '"'], " ");
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w == ["sync_interval", "always"])
    })
}

/// The ultrasync services of the compose file by subcommand (`command[0]`).
fn compose_roles(services: &serde_yaml::Mapping) -> BTreeMap<String, Vec<String>> {
    let mut roles: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service name");
        if name.starts_with("nats-") {
            continue;
        }
        let cmd = strings(svc.get("command"));
        let role = cmd.first().cloned().unwrap_or_default();
        roles.entry(role).or_default().push(name.to_owned());
    }
    roles
}

#[test]
fn compose_file_has_the_production_topology() {
    let dir = deploy();
    let compose = yaml(&dir.join("docker-compose.yml"));
    let services = get(&compose, &["services"])
        .and_then(Value::as_mapping)
        .expect("services");
    let declared_volumes: BTreeSet<String> = get(&compose, &["volumes"])
        .and_then(Value::as_mapping)
        .expect("top-level volumes")
        .keys()
        .map(|k| k.as_str().expect("volume name").to_owned())
        .collect();

    // Three NATS servers, each with its cluster config from deploy/nats/.
    let nats: Vec<&str> = services
        .keys()
        .filter_map(Value::as_str)
        .filter(|n| n.starts_with("nats-"))
        .collect();
    assert_eq!(nats, ["nats-1", "nats-2", "nats-3"], "three NATS nodes");
    for n in &nats {
        let svc = &services[*n];
        let cmd = strings(svc.get("command")).join(" ");
        let conf = format!("/etc/nats/cluster/{n}.conf");
        assert!(cmd.contains(&conf), "{n} runs with -c {conf}: {cmd}");
        assert!(
            strings(svc.get("volumes")).contains(&"./nats:/etc/nats:ro".to_owned()),
            "{n} mounts deploy/nats read-only"
        );
        assert!(strings(svc.get("env_file")).contains(&"env/nats.env".to_owned()));
        assert!(svc.get("healthcheck").is_some(), "{n} has a health check");
        // The config itself belongs to deploy/nats/; check it once it exists.
        let file = dir.join("nats/cluster").join(format!("{n}.conf"));
        if file.exists() {
            let text = read(&file);
            assert!(
                has_sync_always(&text),
                "{} sets jetstream {{ sync_interval: always }}",
                file.display()
            );
            for other in &nats {
                if other != n {
                    assert!(text.contains(other), "{} routes to {other}", file.display());
                }
            }
        } else {
            eprintln!("skipped: {} does not exist yet", file.display());
        }
    }
    let users = dir.join("nats/users.conf");
    if users.exists() {
        let text = read(&users);
        for u in ["admin", "gateway", "sequencer", "materializer", "compactor"] {
            let var = format!("$USYNC_{}_PASSWORD", u.to_uppercase());
            assert!(text.contains(&var), "users.conf reads {var}");
        }
    } else {
        eprintln!("skipped: {} does not exist yet", users.display());
    }

    // The ultrasync services, by subcommand.
    let roles = compose_roles(services);
    let count = |r: &str| roles.get(r).map_or(0, Vec::len);
    assert_eq!(count("gateway"), 2, "{roles:?}");
    assert_eq!(count("sequencer"), 2, "{roles:?}");
    assert_eq!(count("materializer"), 2, "{roles:?}");
    assert_eq!(count("compactor"), 1, "{roles:?}");
    assert_eq!(count("setup"), 1, "{roles:?}");
    assert_eq!(
        roles.values().map(Vec::len).sum::<usize>(),
        8,
        "no service without a known subcommand: {roles:?}"
    );

    let image = str_at(&services["setup"], &["image"]).to_owned();
    let mut materializer_names = BTreeSet::new();
    let mut materializer_volumes = BTreeSet::new();
    for (role, names) in &roles {
        for name in names {
            let svc = &services[name.as_str()];
            assert_eq!(str_at(svc, &["image"]), image, "{name} uses the one image");
            let env = get(svc, &["environment"])
                .and_then(Value::as_mapping)
                .unwrap_or_else(|| panic!("{name}: environment"));
            let var = |k: &str| env.get(k).and_then(Value::as_str).map(str::to_owned);
            assert_eq!(
                var("ULTRASYNC_REPLICAS").as_deref(),
                Some("3"),
                "{name}: R3"
            );
            // TLS to every node, trusting the CA init-env.sh makes (mounted alone).
            let url = var("ULTRASYNC_NATS_URL").unwrap_or_default();
            for n in &nats {
                assert!(url.contains(&format!("tls://{n}:4222")), "{name}: {url}");
            }
            assert!(!url.contains("nats://"), "{name}: no plain NATS URL: {url}");
            let ca = var("ULTRASYNC_NATS_TLS_CA")
                .unwrap_or_else(|| panic!("{name}: ULTRASYNC_NATS_TLS_CA"));
            let ca_mount = format!("./nats/secrets/ca.pem:{ca}:ro");
            assert!(
                strings(svc.get("volumes")).contains(&ca_mount),
                "{name} mounts the CA: {ca_mount}"
            );
            // Its own env file, committed as an example with the right NATS user.
            let files = strings(svc.get("env_file"));
            assert_eq!(files, [format!("env/{role}.env")], "{name}: env file");
            let example = dir.join(format!("env/{role}.env.example"));
            assert!(example.exists(), "{} is committed", example.display());
            let user = env_file(&example)
                .get("ULTRASYNC_NATS_USER")
                .cloned()
                .unwrap_or_default();
            let expected = if role == "setup" { "admin" } else { role };
            assert_eq!(user, expected, "{}", example.display());
            // Named volumes are declared.
            for v in strings(svc.get("volumes")) {
                let source = v.split(':').next().unwrap_or_default();
                if let Some(secret) = source.strip_prefix("./nats/secrets/") {
                    // Written by init-env.sh; of its files the services need the CA only.
                    assert_eq!(secret, "ca.pem", "{name}: mounts {source}");
                } else if source.starts_with('.') || source.starts_with('/') {
                    let host = dir.join(source);
                    assert!(
                        host.exists(),
                        "{name}: bind mount {} exists",
                        host.display()
                    );
                } else {
                    assert!(
                        declared_volumes.contains(source),
                        "{name}: volume {source} declared"
                    );
                    if role == "materializer" {
                        materializer_volumes.insert(source.to_owned());
                    }
                }
            }
            if role == "setup" {
                for n in &nats {
                    assert_eq!(
                        get(svc, &["depends_on", n, "condition"]).and_then(Value::as_str),
                        Some("service_healthy"),
                        "setup waits for {n}"
                    );
                }
            } else {
                assert_eq!(
                    get(svc, &["depends_on", "setup", "condition"]).and_then(Value::as_str),
                    Some("service_completed_successfully"),
                    "{name} starts after setup"
                );
            }
            match role.as_str() {
                "gateway" => assert_eq!(var("ULTRASYNC_LISTEN").as_deref(), Some("0.0.0.0:8080")),
                "compactor" => assert!(var("ULTRASYNC_COMPACTOR_METRICS_LISTEN").is_some()),
                "materializer" => {
                    materializer_names.insert(
                        var("ULTRASYNC_MATERIALIZER_NAME")
                            .unwrap_or_else(|| panic!("{name}: ULTRASYNC_MATERIALIZER_NAME")),
                    );
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        materializer_names.len(),
        2,
        "materializers have their own names"
    );
    assert_eq!(
        materializer_volumes.len(),
        2,
        "materializers have their own volumes"
    );
    for n in &nats {
        assert!(
            declared_volumes.contains(&format!("{n}-data")),
            "{n} volume"
        );
    }

    // The shared config file parses as an ultrasync config.
    ultrasync_shared::config::Config::from_toml(&read(&dir.join("ultrasync.toml")))
        .expect("deploy/ultrasync.toml is a valid config");
}

#[test]
fn env_examples_agree_and_hold_placeholders_only() {
    let dir = deploy().join("env");
    let nats = env_file(&dir.join("nats.env.example"));
    for (file, user) in [
        ("setup", "admin"),
        ("gateway", "gateway"),
        ("sequencer", "sequencer"),
        ("materializer", "materializer"),
        ("compactor", "compactor"),
    ] {
        let env = env_file(&dir.join(format!("{file}.env.example")));
        let var = format!("USYNC_{}_PASSWORD", user.to_uppercase());
        assert_eq!(
            env.get("ULTRASYNC_NATS_PASSWORD"),
            nats.get(&var),
            "{file}.env.example and nats.env.example ({var}) agree"
        );
        for (k, v) in &env {
            if k.contains("PASSWORD") || k.contains("SECRET") {
                assert!(v.starts_with("change-me"), "{file}: {k} is a placeholder");
            }
        }
    }
    for (k, v) in &nats {
        assert!(v.starts_with("change-me"), "nats: {k} is a placeholder");
    }
    let gateway = env_file(&dir.join("gateway.env.example"));
    let jwt = gateway.get("ULTRASYNC_JWT_SECRET").expect("jwt secret");
    assert!(
        jwt.len() >= 32,
        "the example JWT secret is long enough to start"
    );

    // Real env files stay out of git and out of the image.
    let gitignore = read(&root().join(".gitignore"));
    assert!(gitignore.lines().any(|l| l.trim() == "/deploy/env/*.env"));
    let dockerignore = read(&root().join(".dockerignore"));
    assert!(dockerignore.lines().any(|l| l.trim() == "deploy/env/*.env"));
}

#[test]
fn docker_compose_config_accepts_the_file() {
    // The compose file names the real (git-ignored) env files; a project folder of
    // its own gets them from the committed examples, so this passes in a fresh clone.
    let project = tempfile::tempdir().expect("temp dir");
    let env = project.path().join("env");
    fs::create_dir_all(&env).expect("env dir");
    for entry in fs::read_dir(deploy().join("env")).expect("deploy/env") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(real) = name.strip_suffix(".example") {
            fs::copy(&path, env.join(real)).expect("copy env example");
        }
    }
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(deploy().join("docker-compose.yml"))
        .arg("--project-directory")
        .arg(project.path())
        .args(["config", "-q"])
        .env_remove("ULTRASYNC_IMAGE")
        .env_remove("NATS_IMAGE")
        .output()
        .expect("running docker-compose (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "docker-compose config failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_builds_one_binary_into_a_small_non_root_image() {
    let text = read(&deploy().join("Dockerfile"));
    let from: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert_eq!(from.len(), 2, "a builder and a runtime stage: {from:?}");
    assert!(from[1].contains("debian:bookworm-slim"), "{from:?}");
    for needle in [
        "libclang-dev",
        "clang",
        "cargo build --release --locked",
        "HEALTHCHECK",
        "ENTRYPOINT [\"/usr/local/bin/ultrasync\"]",
    ] {
        assert!(text.contains(needle), "Dockerfile: {needle}");
    }
    let user = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "non-root: {user}"
    );
    // Everything the Dockerfile copies from the context exists and is not ignored.
    assert!(deploy().join("healthcheck.sh").exists());
    let ignore = read(&root().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target", ".tools", ".ultrasync", ".git"] {
        assert!(ignored.contains(must), ".dockerignore excludes {must}");
    }
    for kept in [
        "src",
        "shared",
        "Cargo.toml",
        "Cargo.lock",
        "deploy/healthcheck.sh",
    ] {
        assert!(!ignored.contains(kept), ".dockerignore keeps {kept}");
    }
}

/// Values paths (`.Values.a.b`) used in a template.
fn values_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(".Values") {
        rest = &rest[i + ".Values".len()..];
        let mut path = Vec::new();
        while let Some(after) = rest.strip_prefix('.') {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                break;
            }
            path.push(after[..len].to_owned());
            rest = &after[len..];
        }
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

/// The `{{ ... }}` actions of a template; panics on unbalanced delimiters.
fn actions(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let open = rest.find("{{");
        let close = rest.find("}}");
        match (open, close) {
            (None, None) => return out,
            (Some(o), Some(c)) if o < c => {
                let inner = &rest[o + 2..c];
                assert!(!inner.contains("{{"), "{name}: nested {{{{ in {inner:?}");
                out.push(
                    inner
                        .trim_matches(|c: char| c == '-' || c.is_whitespace())
                        .to_owned(),
                );
                rest = &rest[c + 2..];
            }
            _ => panic!(
                "{name}: unbalanced {{{{ / }}}} near {:?}",
                &rest[..rest.len().min(80)]
            ),
        }
    }
}

#[test]
fn helm_chart_is_consistent() {
    let chart_dir = deploy().join("helm/ultrasync");
    let chart = yaml(&chart_dir.join("Chart.yaml"));
    assert_eq!(str_at(&chart, &["apiVersion"]), "v2");
    assert_eq!(str_at(&chart, &["name"]), "ultrasync");
    let deps = get(&chart, &["dependencies"])
        .and_then(Value::as_sequence)
        .expect("dependencies");
    let nats = deps
        .iter()
        .find(|d| d.get("name").and_then(Value::as_str) == Some("nats"))
        .expect("the nats dependency");
    assert_eq!(
        str_at(nats, &["repository"]),
        "https://nats-io.github.io/k8s/helm/charts/"
    );
    assert_eq!(str_at(nats, &["condition"]), "nats.enabled");

    let values = yaml(&chart_dir.join("values.yaml"));
    assert!(
        get(&values, &["nats", "enabled"])
            .and_then(Value::as_bool)
            .is_some()
    );
    assert!(get(&values, &["externalNats", "url"]).is_some());
    assert_eq!(
        get(
            &values,
            &["nats", "config", "merge", "jetstream", "sync_interval"]
        )
        .and_then(Value::as_str),
        Some("always"),
        "the bundled NATS fsyncs every write"
    );
    ultrasync_shared::config::Config::from_toml(str_at(&values, &["config", "toml"]))
        .expect("values config.toml is a valid config");

    // Templates: delimiters, block structure, values keys, helpers, kinds.
    let templates = chart_dir.join("templates");
    let helpers = read(&templates.join("_helpers.tpl"));
    let defined: BTreeSet<String> = actions("_helpers.tpl", &helpers)
        .iter()
        .filter_map(|a| a.strip_prefix("define \""))
        .filter_map(|a| a.split('"').next().map(str::to_owned))
        .collect();
    let mut kinds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files: Vec<PathBuf> = fs::read_dir(&templates)
        .expect("templates")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let text = read(path);
        let acts = actions(name, &text);
        let mut depth = 0i32;
        for a in &acts {
            let word = a.split_whitespace().next().unwrap_or_default();
            if a.starts_with("/*") {
                continue;
            }
            match word {
                "if" | "range" | "with" | "define" | "block" => depth += 1,
                "end" => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{name}: `end` without a block");
            if let Some(rest) = a.split("include \"").nth(1) {
                let helper = rest.split('"').next().unwrap_or_default();
                assert!(
                    defined.contains(helper),
                    "{name}: include of undefined {helper}"
                );
            }
        }
        assert_eq!(depth, 0, "{name}: every if/range/with/define has its end");
        for p in values_paths(&text) {
            let keys: Vec<&str> = p.iter().map(String::as_str).collect();
            assert!(
                get(&values, &keys).is_some(),
                "{name}: .Values.{} is not in values.yaml",
                p.join(".")
            );
        }
        for line in text.lines() {
            if let Some(k) = line.strip_prefix("kind: ") {
                kinds
                    .entry(name.to_owned())
                    .or_default()
                    .insert(k.trim().to_owned());
            }
        }
    }
    let expected: &[(&str, &[&str])] = &[
        ("configmap.yaml", &["ConfigMap"]),
        ("secret.yaml", &["Secret"]),
        ("nats-users-configmap.yaml", &["ConfigMap"]),
        ("gateway.yaml", &["Deployment", "Service"]),
        ("sequencer.yaml", &["Deployment"]),
        ("materializer.yaml", &["Service", "StatefulSet"]),
        ("compactor.yaml", &["Deployment", "Service"]),
        ("pdb.yaml", &["PodDisruptionBudget"]),
        ("setup-job.yaml", &["Job"]),
    ];
    for (file, want) in expected {
        let got: Vec<&str> = kinds
            .get(*file)
            .map(|k| k.iter().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(&got, want, "kinds in {file}");
    }
    for extra in ["NOTES.txt", "_helpers.tpl"] {
        assert!(templates.join(extra).exists(), "{extra}");
    }
    assert!(chart_dir.join("README.md").exists());

    let gateway = read(&templates.join("gateway.yaml"));
    assert!(gateway.contains("path: /healthz") && gateway.contains("path: /readyz"));
    let materializer = read(&templates.join("materializer.yaml"));
    assert!(materializer.contains("volumeClaimTemplates:"));
    let job = read(&templates.join("setup-job.yaml"));
    assert!(job.contains("\"helm.sh/hook\": post-install,pre-upgrade"));
    assert!(job.contains("args: [\"setup\"]"));
    for file in [
        "gateway.yaml",
        "sequencer.yaml",
        "materializer.yaml",
        "compactor.yaml",
    ] {
        let text = read(&templates.join(file));
        for needle in ["resources:", "livenessProbe:", "readinessProbe:"] {
            assert!(text.contains(needle), "{file}: {needle}");
        }
    }

    // TLS to NATS (natsTls): off by default; when on, every workload and the setup Job
    // get the variables the binary reads, pointing into the Secret's mount, and the
    // bundled NATS is reached by tls:// URLs.
    assert_eq!(
        get(&values, &["natsTls", "enabled"]).and_then(Value::as_bool),
        Some(false)
    );
    assert_eq!(str_at(&values, &["natsTls", "caKey"]), "ca.crt");
    let body = |name: &str| -> String {
        let start = format!("{{{{- define \"{name}\" -}}}}");
        let at = helpers
            .find(&start)
            .unwrap_or_else(|| panic!("_helpers.tpl defines {name}"));
        let rest = &helpers[at + start.len()..];
        rest[..rest.find("{{- define").unwrap_or(rest.len())].to_owned()
    };
    let main_rs = read(&root().join("src/main.rs"));
    let tls_env = body("ultrasync.natsTlsEnv");
    for (var, file) in [
        ("ULTRASYNC_NATS_TLS_CA", "ca.pem"),
        ("ULTRASYNC_NATS_TLS_CERT", "client.pem"),
        ("ULTRASYNC_NATS_TLS_KEY", "client-key.pem"),
    ] {
        assert!(
            main_rs.contains(&format!("env = \"{var}\"")),
            "the binary reads {var}"
        );
        assert!(
            tls_env.contains(&format!(
                "- name: {var}\n  value: /etc/ultrasync-nats-tls/{file}\n"
            )),
            "natsTlsEnv sets {var} to the mounted {file}"
        );
        assert!(
            body("ultrasync.natsTlsVolume").contains(&format!("path: {file}")),
            "the Secret's item {file}"
        );
    }
    assert!(body("ultrasync.natsTlsVolumeMount").contains("mountPath: /etc/ultrasync-nats-tls\n"));
    assert!(body("ultrasync.natsTlsVolume").contains(".Values.natsTls.existingSecret"));
    assert!(body("ultrasync.env").contains("include \"ultrasync.natsTlsEnv\" .ctx"));
    assert!(body("ultrasync.volumes").contains("include \"ultrasync.natsTlsVolume\" ."));
    assert!(body("ultrasync.volumeMounts").contains("include \"ultrasync.natsTlsVolumeMount\" ."));
    assert!(
        body("ultrasync.natsUrl").contains("ternary \"tls\" \"nats\" .Values.natsTls.enabled"),
        "tls:// to the bundled NATS with natsTls"
    );
    for file in [
        "gateway.yaml",
        "sequencer.yaml",
        "materializer.yaml",
        "compactor.yaml",
    ] {
        let text = read(&templates.join(file));
        for helper in [
            "ultrasync.env",
            "ultrasync.volumes",
            "ultrasync.volumeMounts",
        ] {
            assert!(
                text.contains(&format!("include \"{helper}\"")),
                "{file} includes {helper}"
            );
        }
    }
    for helper in [
        "ultrasync.natsTlsEnv",
        "ultrasync.natsTlsVolume",
        "ultrasync.natsTlsVolumeMount",
        "ultrasync.natsUrl",
    ] {
        assert!(
            job.contains(&format!("include \"{helper}\"")),
            "setup-job.yaml includes {helper}"
        );
    }

    // The NATS users of the bundled server are deploy/nats/users.conf itself.
    let link = chart_dir.join("files/nats-users.conf");
    assert_eq!(
        fs::read_link(&link).expect("files/nats-users.conf is a link"),
        Path::new("../../../nats/users.conf")
    );
    if !link.exists() {
        eprintln!("skipped: deploy/nats/users.conf does not exist yet");
    }
}

/// Compose, Helm and the test tools run the same nats-server, one new enough for
/// atomic batch publish (every service refuses an older one at start-up).
#[test]
fn every_deployment_pins_the_tested_nats_server() {
    use ultrasync_shared::nats::{MIN_SERVER_VERSION, TESTED_SERVER_VERSION, check_server_version};
    check_server_version(TESTED_SERVER_VERSION).expect("the tested version is supported");
    assert!(MIN_SERVER_VERSION >= (2, 12));
    let compose = read(&deploy().join("docker-compose.yml"));
    assert!(
        compose.contains(&format!(
            "${{NATS_IMAGE:-nats:{TESTED_SERVER_VERSION}-alpine}}"
        )),
        "compose does not default to nats:{TESTED_SERVER_VERSION}-alpine"
    );
    let values = yaml(&deploy().join("helm/ultrasync/values.yaml"));
    assert_eq!(
        get(&values, &["nats", "container", "image", "tag"]).and_then(Value::as_str),
        Some(format!("{TESTED_SERVER_VERSION}-alpine").as_str())
    );
    let setup = read(&deploy().join("../scripts/setup.sh"));
    assert!(
        setup.contains(&format!("NATS_SERVER_VERSION:-{TESTED_SERVER_VERSION}")),
        "scripts/setup.sh installs another nats-server"
    );
}

/// NATS monitoring needs no password: every shipped server config keeps it on
/// loopback.
#[test]
fn nats_monitoring_listens_on_loopback_only() {
    for conf in [
        "nats/single.conf",
        "nats/cluster/nats-1.conf",
        "nats/cluster/nats-2.conf",
        "nats/cluster/nats-3.conf",
        "nats/region/hub.conf",
        "nats/region/leaf.conf",
    ] {
        let text = read(&deploy().join(conf));
        let http: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("http:"))
            .collect();
        assert_eq!(http, ["http: 127.0.0.1:8222"], "{conf}");
    }
}

/// Replaces every `from` in `text`, panicking when there is none (the shipped file
/// changed under the test).
fn replace_all(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not found in:\n{text}");
    text.replace(from, to)
}

/// A nats-server started by a test, killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `deploy/init-env.sh` writes what the shipped NATS configs need, and with it they
/// run: on a copy of `deploy/`, the script writes the route credentials, a private CA
/// and the nodes' certificate (for nats-1..3, localhost and 127.0.0.1, usable by
/// servers and by routes as clients), keys and credentials readable by their owner
/// only; every cluster and region config and `single.conf` pass `nats-server -t` with those files
/// in place of `/etc/nats/`; and the three cluster configs, moved to loopback (ports,
/// store, node names) and otherwise as shipped, form a cluster over TLS routes that a
/// client trusting `ca.pem` uses for an R3 stream, while a plain client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_env_makes_the_shipped_nats_configs_run_with_tls() {
    use std::os::unix::fs::PermissionsExt as _;

    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("deploy");
    for dir in ["env", "nats", "nats/cluster", "nats/region"] {
        fs::create_dir_all(copy.join(dir)).expect("mkdir");
    }
    let confs = [
        "nats/cluster/nats-1.conf",
        "nats/cluster/nats-2.conf",
        "nats/cluster/nats-3.conf",
        "nats/single.conf",
        "nats/region/hub.conf",
        "nats/region/leaf.conf",
    ];
    for file in [
        "init-env.sh",
        "nats/users.conf",
        "nats/region/hub-users.conf",
    ]
    .iter()
    .chain(&confs)
    {
        fs::copy(deploy().join(file), copy.join(file)).expect("copy");
    }
    for entry in fs::read_dir(deploy().join("env")).expect("env") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "example") {
            fs::copy(
                &path,
                copy.join("env").join(path.file_name().expect("name")),
            )
            .expect("copy");
        }
    }
    let run_init = || {
        Command::new("bash")
            .arg(copy.join("init-env.sh"))
            .output()
            .expect("run init-env.sh")
    };
    let out = run_init();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What it wrote, with which permissions; the CA's key is not kept.
    let secrets = copy.join("nats/secrets");
    let mut written: Vec<String> = fs::read_dir(&secrets)
        .expect("secrets")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["ca.pem", "routes.conf", "server-key.pem", "server.pem"]
    );
    let mode = |f: &str| {
        fs::metadata(secrets.join(f))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    };
    for (file, want) in [
        ("routes.conf", 0o600),
        ("server-key.pem", 0o600),
        ("server.pem", 0o644),
        ("ca.pem", 0o644),
    ] {
        assert_eq!(mode(file), want, "{file}");
    }
    let routes_file = secrets.join("routes.conf");
    let routes = read(&routes_file);
    assert!(
        routes.contains("authorization { user: route, password: \""),
        "the route credentials"
    );
    assert_eq!(routes.matches("nats-route://route:").count(), 3);

    // A second run changes nothing (all or nothing).
    let before = read(&secrets.join("ca.pem"));
    assert!(!run_init().status.success(), "a second run refuses");
    assert_eq!(read(&secrets.join("ca.pem")), before);

    // The certificate: signed by the CA, for every name the nodes are reached by,
    // and accepted from a dialing node (client auth) as routes with `verify` need.
    {
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        use std::sync::Arc;
        let ca = CertificateDer::from_pem_file(secrets.join("ca.pem")).expect("ca.pem");
        let cert = CertificateDer::from_pem_file(secrets.join("server.pem")).expect("cert");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("the CA");
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("server verifier");
        for name in ["nats-1", "nats-2", "nats-3", "localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).expect("name");
            server
                .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("server.pem for {name:?}: {e}"));
        }
        let other = ServerName::try_from("nats-4").expect("name");
        assert!(
            server
                .verify_server_cert(&cert, &[], &other, &[], UnixTime::now())
                .is_err(),
            "server.pem is for the three nodes only"
        );
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("client verifier")
            .verify_client_cert(&cert, &[], UnixTime::now())
            .expect("server.pem as a route's client certificate");
    }

    let mut env: Vec<(String, String)> = read(&copy.join("env/nats.env"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // The region configs' own variables (a two-region setup is not in compose).
    env.extend([
        ("USYNC_LEAF_PASSWORD".to_owned(), "leaf-password".to_owned()),
        (
            "USYNC_HUB_LEAFNODE_URL".to_owned(),
            "tls://leaf:leaf-password@hub:7422".to_owned(),
        ),
    ]);
    let admin_password = env
        .iter()
        .find(|(k, _)| k == "USYNC_ADMIN_PASSWORD")
        .map(|(_, v)| v.clone())
        .expect("admin password");
    let bin = ultrasync_shared::natsd::find_nats_server(None).expect("nats-server");
    let nats_dir = copy.join("nats");
    let at_host = |text: &str| replace_all(text, "/etc/nats/", &format!("{}/", nats_dir.display()));

    // Every shipped config with the generated files where the containers have them.
    // (Written next to the original: includes are relative to the config's folder.)
    for conf in &confs {
        let host = copy.join(conf.replace(".conf", ".host.conf"));
        fs::write(&host, at_host(&read(&copy.join(conf)))).expect("write");
        let out = Command::new(&bin)
            .args(["-t", "-c"])
            .arg(&host)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("nats-server -t");
        assert!(
            out.status.success(),
            "{conf}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The cluster on loopback: node i's client, route and monitoring ports, its
    // store, and `localhost` (a name of the certificate) for the node names.
    let ports = ultrasync_shared::natsd::free_ports(9).expect("ports");
    let (client, rest) = ports.split_at(3);
    let (route, monitor) = rest.split_at(3);
    let mut routes = routes;
    for (i, port) in route.iter().enumerate() {
        routes = replace_all(
            &routes,
            &format!("@nats-{}:6222", i + 1),
            &format!("@localhost:{port}"),
        );
    }
    fs::write(&routes_file, routes).expect("rewrite routes.conf");
    let mut servers = Vec::new();
    for i in 0..3 {
        let n = i + 1;
        let mut text = at_host(&read(&copy.join(confs[i])));
        for (from, to) in [
            (
                "/data/jetstream".to_owned(),
                tmp.path().join(format!("store-{n}")).display().to_string(),
            ),
            (
                "listen: 0.0.0.0:4222".to_owned(),
                format!("listen: 127.0.0.1:{}", client[i]),
            ),
            (
                "listen: 0.0.0.0:6222".to_owned(),
                format!("listen: 127.0.0.1:{}", route[i]),
            ),
            (
                format!("\"nats-{n}:4222\""),
                format!("\"localhost:{}\"", client[i]),
            ),
            (
                format!("\"nats-{n}:6222\""),
                format!("\"localhost:{}\"", route[i]),
            ),
            (
                "http: 127.0.0.1:8222".to_owned(),
                format!("http: 127.0.0.1:{}", monitor[i]),
            ),
        ] {
            text = replace_all(&text, &from, &to);
        }
        let conf = copy.join(format!("nats/cluster/nats-{n}.loopback.conf"));
        fs::write(&conf, text).expect("write");
        let log = fs::File::create(tmp.path().join(format!("nats-{n}.log"))).expect("log");
        servers.push(Server(
            Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start nats-server"),
        ));
    }
    let logs = || {
        (1..=3)
            .map(|n| {
                let log = fs::read_to_string(tmp.path().join(format!("nats-{n}.log")))
                    .unwrap_or_default();
                format!("--- nats-{n}:\n{log}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // A client trusting the CA, as the services connect: an R3 stream needs all three
    // nodes, i.e. the TLS routes.
    let config = ultrasync_shared::config::Config {
        nats_url: client
            .iter()
            .map(|p| format!("tls://localhost:{p}"))
            .collect::<Vec<_>>()
            .join(","),
        nats_tls_ca: Some(secrets.join("ca.pem")),
        nats_user: Some("admin".to_owned()),
        nats_password: Some(admin_password.clone()),
        ..Default::default()
    };
    let nats = ultrasync_shared::nats::connect(&config, "deploy-test", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("connect over TLS: {e:#}\n{}", logs()));
    let js = async_nats::jetstream::new(nats);
    let mut created = None;
    for _ in 0..300 {
        match js
            .create_stream(async_nats::jetstream::stream::Config {
                name: "TLS_CHECK".to_owned(),
                subjects: vec!["tls.check".to_owned()],
                num_replicas: 3,
                ..Default::default()
            })
            .await
        {
            Ok(s) => {
                created = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut stream = created.unwrap_or_else(|| panic!("no R3 stream over TLS routes\n{}", logs()));
    js.publish("tls.check", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("acked by the R3 stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 1);
    assert_eq!(
        info.cluster.as_ref().map(|c| c.replicas.len()),
        Some(2),
        "a leader and two replicas"
    );

    // Without TLS (and without the CA) the client port refuses.
    let plain = tokio::time::timeout(
        Duration::from_secs(20),
        async_nats::ConnectOptions::new()
            .user_and_password("admin".to_owned(), admin_password)
            .connect(format!("nats://127.0.0.1:{}", client[0])),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a plain client connected to the TLS port"
    );
    drop(servers);
}
