//! The CloudStack backend end to end, against the CloudStack API emulator
//! (the one part of the world that is emulated: no real CloudStack can run
//! here), with real RabbitMQ, PostgreSQL and NBD.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Env, WAIT};
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::cloudstack::emulator::{Emulator, EmulatorConfig, Faults};
use volumed::contract::{ErrorCode, EventType};
use volumed::topology;

const HOST: &str = "oma-c";
const API_KEY: &str = "volumed-test-key";
const SECRET: &str = "volumed-test-secret";

async fn emulator(env: &Env, latency_ms: u64) -> Emulator {
    let cfg = EmulatorConfig {
        api_key: API_KEY.into(),
        secret_key: SECRET.into(),
        appliance_vm: env.appliance,
        device_dir: env.device_dir(HOST),
        data_dir: env.dir.path().join("cloud"),
        job_latency: Duration::from_millis(latency_ms),
    };
    std::fs::create_dir_all(&cfg.data_dir).expect("cloud dir");
    std::fs::create_dir_all(&cfg.device_dir).expect("device dir");
    let (emu, _addr, _task) = Emulator::spawn(cfg).await.expect("emulator starts");
    emu.create_vm(env.appliance, "appliance");
    emu
}

fn cs_env(emu: &Emulator, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("VOLUMED_BACKEND", "cloudstack".into()),
        ("VOLUMED_CLOUDSTACK_URL", emu.url()),
        ("VOLUMED_CLOUDSTACK_API_KEY", API_KEY.into()),
        ("VOLUMED_CLOUDSTACK_SECRET_KEY", secret.to_string()),
        ("VOLUMED_CLOUDSTACK_JOB_TIMEOUT_SECS", "30".into()),
        ("VOLUMED_WORKERS", "8".into()),
    ]
}

fn start(env: &Env, emu: &Emulator, extra: &[(&str, &str)]) -> common::Daemon {
    let owned = cs_env(emu, SECRET);
    let mut all: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    env.start(HOST, &all)
}

fn attaches_of(emu: &Emulator, vol: Uuid) -> usize {
    emu.calls()
        .iter()
        .filter(|c| c.command == "attachVolume" && c.volume_id == vol)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_detach_through_the_cloud_with_export_and_events() {
    let env = Env::new("cs_e2e").await;
    let emu = emulator(&env, 100).await;
    let _d = start(&env, &emu, &[]);
    let client = env.client().await;
    let vol = emu.create_volume(4 << 20).expect("volume");

    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("attach event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    let dev = ev.device.expect("device");
    assert!(dev
        .stable_path
        .ends_with(&volumed::backend::by_id_name(vol)));
    let export = ev.export.expect("export");
    assert!(
        ev.cloud_device_id.is_some(),
        "the device id CloudStack assigned"
    );
    assert_eq!(emu.attached_to(vol), Some(env.appliance));

    // Data written over NBD lands in the cloud volume's backing file.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{}/{}", export.port, export.name),
        ])
        .args(["-c", "write -P 0x77 0 1M"])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backing = std::fs::read(&dev.path).expect("backing file");
    assert!(backing[..1 << 20].iter().all(|b| *b == 0x77));

    // Attaching again: success without a second cloud call.
    let again = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("again");
    assert_eq!(again.event_type, EventType::AttachSucceeded);
    assert_eq!(attaches_of(&emu, vol), 1);

    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, None), WAIT)
        .await
        .expect("detach event");
    assert_eq!(ev.event_type, EventType::DetachSucceeded, "{ev:?}");
    assert_eq!(emu.attached_to(vol), None);
    assert!(
        !common::exists(std::path::Path::new(&dev.stable_path)),
        "device gone"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_volumes_on_four_vms_never_collide() {
    let env = Env::new("cs_pervm").await;
    let emu = emulator(&env, 150).await;
    emu.set_faults(Faults {
        collide_concurrent_attaches: Some(true),
        ..Default::default()
    });
    let vms: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for (i, vm) in vms.iter().enumerate() {
        emu.create_vm(*vm, &format!("recovered-{i}"));
    }
    let _d = start(&env, &emu, &[]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let mut target = HashMap::new();
    for i in 0..20 {
        let vol = emu.create_volume(1 << 20).expect("volume");
        let vm = vms[i % 4];
        let r = Outgoing::attach(HOST, vol, vm, true);
        client.publish(&r).await.expect("publish");
        target.insert(r.request_id, (vol, vm));
    }
    let events = common::collect_events(&mut sub, 20, Duration::from_millis(300)).await;
    let mut ids: HashMap<Uuid, HashSet<i64>> = HashMap::new();
    for (id, evs) in &events {
        assert_eq!(evs.len(), 1);
        let e = &evs[0];
        assert_eq!(e.event_type, EventType::AttachSucceeded, "{e:?}");
        let (vol, vm) = target[id];
        assert_eq!(emu.attached_to(vol), Some(vm));
        assert_eq!(e.device, None, "failover: no local device");
        assert_eq!(e.export, None, "failover: no export");
        let dev = e.cloud_device_id.expect("device id reported");
        assert!(
            ids.entry(vm).or_default().insert(dev),
            "device id {dev} twice on {vm}"
        );
    }
    assert_eq!(emu.max_in_flight_per_vm(), 1, "one job per VM at a time");
    assert!(
        emu.max_in_flight_total() > 1,
        "jobs of different VMs run in parallel: at most {} at once",
        emu.max_in_flight_total()
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_during_a_job_polls_the_same_job_after_restart() {
    let env = Env::new("cs_resume").await;
    let emu = emulator(&env, 1500).await;
    let client = env.client().await;
    env.durable_event_queue("test.events").await;
    let vol = emu.create_volume(1 << 20).expect("volume");
    let mut d = start(
        &env,
        &emu,
        &[("VOLUMED_FAILPOINTS", "after_job_recorded=abort")],
    );
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    client.publish(&req).await.expect("publish");
    assert!(!d.wait_exit(WAIT).success(), "died with the job pending");
    let job: Option<String> =
        sqlx::query_scalar("SELECT cloud_job_id FROM operations WHERE request_id = $1")
            .bind(req.request_id)
            .fetch_one(&env.pool)
            .await
            .expect("journal");
    let job = job.expect("job id journalled before polling");

    let d2 = start(&env, &emu, &[]);
    env.wait_count(
        &format!(
            "SELECT count(*) FROM outbox WHERE request_id = '{}' AND sent_at IS NOT NULL",
            req.request_id
        ),
        1,
    )
    .await;
    let got = env.drain_queue("test.events").await;
    let event: volumed::contract::Event =
        serde_json::from_slice(&got[0].delivery.data).expect("event");
    assert_eq!(event.event_type, EventType::AttachSucceeded, "{event:?}");
    assert_eq!(attaches_of(&emu, vol), 1, "exactly one attach call");
    assert_eq!(emu.calls()[0].job_id.to_string(), job);
    assert!(d2
        .log()
        .iter()
        .any(|l| l.contains("resuming the backend job")));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_and_judged_by_a_reread() {
    let env = Env::new("cs_faults").await;
    let emu = emulator(&env, 50).await;
    let _d = start(&env, &emu, &[]);
    let client = env.client().await;
    let vm = Uuid::new_v4();
    emu.create_vm(vm, "recovered");

    // A job that reports failure but took effect is a success.
    emu.set_faults(Faults {
        late_success_jobs: Some(1),
        ..Default::default()
    });
    let vol = emu.create_volume(1 << 20).expect("volume");
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, vm, true), WAIT)
        .await
        .expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    // In the first attempt: the re-read made it a success, not a retry.
    assert_eq!(ev.attempts, 1, "{ev:?}");
    assert_eq!(attaches_of(&emu, vol), 1);
    emu.set_faults(Faults {
        late_success_jobs: Some(1),
        ..Default::default()
    });
    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, None), WAIT)
        .await
        .expect("event");
    assert_eq!(ev.event_type, EventType::DetachSucceeded, "{ev:?}");
    assert_eq!(ev.attempts, 1, "{ev:?}");
    assert_eq!(
        emu.calls()
            .iter()
            .filter(|c| c.command == "detachVolume" && c.volume_id == vol)
            .count(),
        1
    );

    // A burst of 530s is retried through.
    emu.set_faults(Faults {
        http_530_calls: Some(3),
        ..Default::default()
    });
    let vol = emu.create_volume(1 << 20).expect("volume");
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, vm, true), WAIT)
        .await
        .expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(ev.attempts, 1, "absorbed by the client's read retries");
    assert_eq!(attaches_of(&emu, vol), 1);

    // A 431 is reported at once and never retried.
    emu.set_faults(Faults {
        param_error_calls: Some(1),
        ..Default::default()
    });
    let vol = emu.create_volume(1 << 20).expect("volume");
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, vm, true), WAIT)
        .await
        .expect("event");
    assert_eq!(ev.event_type, EventType::AttachFailed, "{ev:?}");
    let err = ev.error.expect("error");
    assert_eq!(err.code, ErrorCode::BackendRejected);
    assert!(!err.retryable);
    assert_eq!(attaches_of(&emu, vol), 0, "no retry after 431");
    assert_eq!(emu.attached_to(vol), None);
    client.close().await;
}

/// The errors the journal recorded for a request: (attempt, code, message).
async fn errors_of(env: &Env, request: Uuid) -> Vec<(i32, String, String)> {
    sqlx::query_as(
        "SELECT attempt, code, message FROM operation_errors WHERE request_id = $1 ORDER BY id",
    )
    .bind(request)
    .fetch_all(&env.pool)
    .await
    .expect("error history")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_530_burst_and_a_job_that_never_finishes_are_retried_to_one_success() {
    let env = Env::new("cs_retry").await;
    let emu = emulator(&env, 50).await;
    let d = start(
        &env,
        &emu,
        &[
            ("VOLUMED_CLOUDSTACK_JOB_TIMEOUT_SECS", "1"),
            ("VOLUMED_RETRY_DELAYS", "100ms,200ms"),
        ],
    );
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vm = Uuid::new_v4();
    emu.create_vm(vm, "recovered");

    // A job that never finishes: past the job timeout the volume is
    // re-read, the job has done nothing, so the attempt fails transiently
    // and its retry starts a new attach, which succeeds. One terminal
    // event, no failed one before it.
    emu.set_faults(Faults {
        stuck_jobs: Some(1),
        ..Default::default()
    });
    let vol = emu.create_volume(1 << 20).expect("volume");
    let req = Outgoing::attach(HOST, vol, vm, true);
    client.publish(&req).await.expect("publish");
    let ev = sub.wait_for(req.request_id, WAIT).await.expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(ev.attempts, 2, "{ev:?}");
    assert_eq!(attaches_of(&emu, vol), 2, "the stuck job, then the retry's");
    assert_eq!(emu.attached_to(vol), Some(vm));
    let errors = errors_of(&env, req.request_id).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (1, "backend_unavailable")
    );
    assert!(errors[0].2.contains("did not finish"), "{errors:?}");
    let extra = sub.next(Duration::from_millis(500)).await.expect("stream");
    assert!(extra.is_none(), "a second event: {extra:?}");
    env.wait_count(
        &format!(
            "SELECT count(*) FROM outbox WHERE request_id = '{}'",
            req.request_id
        ),
        1,
    )
    .await;

    // The start-up reconciliation (5 s after the start) reads the cloud
    // too: once it is done, every injected 530 meets the request under test.
    d.wait_log("reconciled: no drift", WAIT);

    // Six 530s in a row, more than the client's four tries of a read: the
    // first attempt fails transiently and comes back through the delay
    // queue; the second meets the last two, tries again, and succeeds.
    emu.set_faults(Faults {
        http_530_calls: Some(6),
        ..Default::default()
    });
    let vol = emu.create_volume(1 << 20).expect("volume");
    let req = Outgoing::attach(HOST, vol, vm, true);
    client.publish(&req).await.expect("publish");
    let ev = sub.wait_for(req.request_id, WAIT).await.expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(ev.attempts, 2, "{ev:?}");
    assert_eq!(emu.faults().http_530_calls, Some(0), "the burst is spent");
    assert_eq!(attaches_of(&emu, vol), 1);
    let errors = errors_of(&env, req.request_id).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_str()),
        (1, "backend_unavailable")
    );
    assert!(errors[0].2.contains("530"), "{errors:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_secret_stops_consumption_without_burning_messages() {
    let env = Env::new("cs_auth").await;
    let emu = emulator(&env, 50).await;
    let owned = cs_env(&emu, "not-the-secret");
    let all: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = env.spawn(HOST, &all);
    d.wait_log("not consuming: the backend refuses", WAIT);
    let client = env.client().await;
    // The queue exists (topology declared) and takes requests, which wait.
    for _ in 0..3 {
        let vol = emu.create_volume(1 << 20).expect("volume");
        client
            .publish(&Outgoing::attach(HOST, vol, env.appliance, true))
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.queue_depth(&topology::request_queue(HOST)).await,
        3,
        "all still queued"
    );
    assert_eq!(
        env.queue_depth(&topology::dead_queue(HOST)).await,
        0,
        "none dead-lettered"
    );
    assert!(emu.calls().is_empty());
    assert!(emu.rejected_signatures() >= 1);
    let log = d.log().join("\n");
    assert!(log.contains("401"), "the log names the cause: {log}");
    assert!(
        !log.contains("not-the-secret"),
        "the secret never appears in logs"
    );
    client.close().await;
}
