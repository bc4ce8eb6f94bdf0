//! `volumed bench` end to end on a small burst: it runs, reports the
//! daemon and the floor over two rounds, and draws its plot.

mod common;

use common::Env;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_reports_the_daemon_against_the_floor_and_plots() {
    let env = Env::new("bench").await;
    let plot = env.dir.path().join("bench.png");
    let plot_s = plot.display().to_string();
    let out = env.cli(
        "oma-b",
        &[
            "bench",
            "--requests",
            "20",
            "--volumes",
            "10",
            "--workers",
            "4",
            "--rounds",
            "2",
            "--json",
            "--plot",
            &plot_s,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["daemon"]["requests"], 20);
    // Two rounds: both listed, the report is one of them.
    let rounds = report["rounds"].as_array().expect("rounds listed");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    let shown = report["daemon"]["throughput_per_s"].as_f64().expect("rate");
    assert!(
        rounds
            .iter()
            .any(|r| r["throughput_per_s"].as_f64() == Some(shown)),
        "{shown} is not one of {rounds:?}"
    );
    assert_eq!(report["failed_events"], 0);
    assert_eq!(report["floor"]["requests"], 20);
    // Without --queued both pipelines start with the whole burst queued.
    assert_eq!(report["daemon"]["max_in_flight"], 20);
    assert_eq!(report["floor"]["max_in_flight"], 20);
    assert!(report["throughput_ratio"].as_f64().expect("ratio") > 0.0);
    assert!(report["sustained_ratio"].as_f64().expect("sustained ratio") > 0.0);
    assert!(
        report["daemon"]["sustained_per_s"]
            .as_f64()
            .expect("sustained")
            > 0.0
    );
    assert!(
        report["daemon"]["p99_ms"].as_f64().expect("p99")
            >= report["daemon"]["p50_ms"].as_f64().expect("p50")
    );
    let first = report["daemon"]["first_ms"].as_f64().expect("first event");
    assert!(
        first > 0.0 && first <= report["daemon"]["max_ms"].as_f64().expect("max"),
        "the first event comes after the first publish and no later than the last: {first}"
    );
    assert!(report["daemon_peak_rss_mib"].as_f64().expect("rss") > 1.0);
    // Every run starts from vacuumed tables, whatever autovacuum does.
    let vacuumed: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("vacuum times");
    for table in [
        "nbd_exports",
        "operation_errors",
        "operations",
        "outbox",
        "volume_attachments",
    ] {
        assert!(
            vacuumed.iter().any(|t| t == table),
            "{table} was not vacuumed before the run: {vacuumed:?}"
        );
    }
    assert_eq!(report["nbd_reloads"], 0, "nbdkit needs no reload");
    let png = std::fs::read(&plot).expect("plot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // What the bench created is gone again: no rows of its host remain.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE host LIKE 'bench-%'")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
    // Nor any queue: the daemon's and the floor's are all deleted.
    let queues = common::rabbitmqctl(&["list_queues", "-p", &env.vhost, "name", "-q"]);
    let left: Vec<&str> = queues.lines().filter(|l| l.contains("bench")).collect();
    assert!(left.is_empty(), "queues left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_queued_the_daemon_and_the_floor_keep_that_many_requests_in_flight() {
    let env = Env::new("bench_queued").await;
    // A run with 10 kept in flight; `more` adds to the arguments.
    let queued = |more: &[&str]| -> Value {
        let mut args = vec![
            "bench",
            "--volumes",
            "20",
            "--workers",
            "4",
            "--queued",
            "10",
            "--json",
        ];
        args.extend_from_slice(more);
        let out = env.cli("oma-bq", &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    };
    let report = queued(&["--requests", "60"]);
    assert_eq!(report["failed_events"], 0);
    assert_eq!(report["queued"], 10);
    // Both pipelines are fed the same way: 60 requests, never more than
    // 10 of them in flight, and a rate at that depth for the ratio.
    for side in ["daemon", "floor"] {
        let f = &report[side];
        assert_eq!(f["requests"], 60, "{side}: {f}");
        let most = f["max_in_flight"].as_u64().expect("max in flight");
        assert!(
            (1..=10).contains(&most),
            "{side}: never more than 10 in flight: {most}"
        );
        assert!(
            f["sustained_per_s"].as_f64().expect("sustained") > 0.0,
            "{side}: {f}"
        );
    }
    assert!(report["sustained_ratio"].as_f64().expect("ratio") > 0.0);

    // With --no-floor the daemon alone keeps the depth (how the
    // 10,000-against-500 target is measured).
    let report = queued(&["--requests", "40", "--no-floor"]);
    assert!(report["floor"].is_null(), "no floor with --no-floor");
    assert_eq!(report["daemon"]["requests"], 40);
    let most = report["daemon"]["max_in_flight"]
        .as_u64()
        .expect("max in flight");
    assert!(
        (1..=10).contains(&most),
        "never more than 10 in flight: {most}"
    );
    assert!(
        report["daemon"]["sustained_per_s"]
            .as_f64()
            .expect("sustained")
            > 0.0
    );

    // A depth the run is too short to hold is refused before anything
    // starts.
    let refused = env.cli("oma-bq", &["bench", "--requests", "15", "--queued", "10"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("at least 20"), "{err}");
}
