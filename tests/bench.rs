//! `ultrasync bench --quick` end to end: every scenario runs against its own stack and
//! the report and chart are written. Figures are not asserted (they are measured by
//! the benchmark, not by tests), only that each section is there and consistent
//! (something acked, p50 <= p99).

use std::process::Command;

use serde_json::Value;

#[test]
fn a_quick_bench_writes_a_report_and_a_chart() {
    let out = tempfile::tempdir().expect("tmp");
    let run = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args([
            "bench",
            "--quick",
            "--subscribers",
            "10",
            "--bootstrap-keys",
            "300",
            "--out",
        ])
        .arg(out.path())
        .env("ULTRASYNC_LOG", "error")
        .output()
        .expect("run bench");
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_slice(&run.stdout).expect("report on stdout");
    for scenario in [
        "jetstream",
        "throughput",
        "closed",
        "latency",
        "fanout",
        "bootstrap",
        "tenants",
        "processes",
    ] {
        assert!(report.get(scenario).is_some(), "no {scenario} in {report}");
    }
    assert!(
        report["jetstream"]["ops_per_sec"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
    assert!(report["latency"]["latency"]["p99_ms"].as_f64().is_some());
    // Every command of an open-loop step was sent on a schedule, and how late the
    // load generator was is reported beside the latency it measured (one lag per
    // command sent, one latency per command acked).
    let sent = report["latency"]["send_lag"]["count"].as_u64().unwrap_or(0);
    let acked = report["latency"]["latency"]["count"].as_u64().unwrap_or(0);
    assert!(sent >= acked && acked > 0, "{}", report["latency"]);
    // The stack runs in processes of its own: the CPU each step cost is reported per
    // acked op, for the ultrasync processes and nats-server apart from the load
    // generator.
    let closed = &report["closed"];
    assert!(closed["acked"].as_u64().is_some_and(|a| a > 0), "{closed}");
    assert_eq!(closed["writers"].as_u64(), Some(8), "{closed}");
    for cpu in [
        &closed["cpu"],
        &report["latency"]["cpu"],
        &report["fanout"]["cpu"],
    ] {
        for part in ["ultrasync", "nats_server", "server_total", "load_generator"] {
            assert!(
                cpu["cpu_us_per_op"][part]
                    .as_f64()
                    .is_some_and(|v| v >= 0.0),
                "no {part} in {cpu}"
            );
        }
        assert!(
            cpu["cpu_secs"]["ultrasync"]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{cpu}"
        );
    }
    // The sequencers' durable writes during the closed loop, from their `/metrics`:
    // every acked op was in one, a write carries at least one op.
    let writes = &closed["cpu"]["durable_writes"];
    assert!(
        writes["ops_per_key_write"]
            .as_f64()
            .is_some_and(|o| o >= 1.0)
            && writes["key_writes_per_acked_op"]
                .as_f64()
                .is_some_and(|w| w > 0.0 && w <= 1.0)
            && writes["keys_per_round"].as_f64().is_some_and(|k| k >= 1.0),
        "{writes}"
    );
    let processes = report["processes"].as_object().expect("processes");
    for role in [
        "ultrasync gateway",
        "ultrasync materializer",
        "ultrasync sequencer-1",
        "nats-server",
    ] {
        assert!(processes.contains_key(role), "no {role} in {processes:?}");
    }
    assert!(
        report["fanout"]["latency"]["count"]
            .as_u64()
            .is_some_and(|c| c > 0)
    );
    assert_eq!(report["bootstrap"]["keys"].as_u64(), Some(300));
    // The tenants scenario: one run per sequencer count, each on its own stack with
    // sequencer processes sharing the partitions, every step acked something.
    let tenants = &report["tenants"];
    assert_eq!(tenants["stream_keys"].as_u64(), Some(50), "{tenants}");
    let runs = tenants["runs"].as_array().expect("tenant runs");
    let counts: Vec<u64> = runs
        .iter()
        .filter_map(|r| r["sequencers"].as_u64())
        .collect();
    assert_eq!(counts, [1, 2, 3], "{tenants}");
    for run in runs {
        assert!(run["partitions"].as_u64().is_some_and(|p| p > 0), "{run}");
        let sequencers = run["processes"]
            .as_object()
            .expect("processes")
            .keys()
            .filter(|k| k.starts_with("ultrasync sequencer"))
            .count() as u64;
        assert_eq!(Some(sequencers), run["sequencers"].as_u64(), "{run}");
        let steps = run["steps"].as_array().expect("steps");
        assert!(!steps.is_empty(), "{run}");
        for s in steps {
            assert!(s["acked"].as_u64().is_some_and(|a| a > 0), "{s}");
            let (p50, p99) = (
                s["latency"]["p50_ms"].as_f64().expect("p50"),
                s["latency"]["p99_ms"].as_f64().expect("p99"),
            );
            assert!(p50 > 0.0 && p50 <= p99, "{s}");
        }
    }
    let files: Vec<String> = std::fs::read_dir(out.path())
        .expect("results")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(files.iter().any(|f| f.ends_with(".json")), "{files:?}");
    let svg = files.iter().find(|f| f.ends_with(".svg")).expect("a chart");
    let text = std::fs::read_to_string(out.path().join(svg)).expect("svg");
    let doc = roxmltree::Document::parse(&text).expect("the chart is well-formed XML");
    assert!(doc.root_element().has_tag_name("svg"), "{text}");
    let labels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(str::trim))
        .collect();
    for want in [
        "offered ops/s",
        "acked ops/s",
        "ack latency, ms (log scale)",
        "p99 target 100 ms",
        "p50, throughput",
        "p99, throughput",
        "p99, tenants, 3 sequencer(s)",
    ] {
        assert!(labels.contains(&want), "no {want:?} in {labels:?}");
    }
    assert!(
        labels.iter().any(|l| l.starts_with("raw JetStream ")),
        "{labels:?}"
    );
}
