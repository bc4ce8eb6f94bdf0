//! The CloudStack emulator over real HTTP: signature checks, the attach and
//! detach job lifecycle with its device links, and each injected fault.
//!
//! Every test spawns its own emulator on a free port with its own temporary
//! directories. Jobs are waited for by polling `queryAsyncJobResult`, as a
//! CloudStack client does; a "stays pending" claim is checked against a
//! later job with the same latency that has finished, not after a sleep.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use tempfile::TempDir;
use uuid::Uuid;
use volumed::cloudstack::emulator::{virtio_serial, Call, Emulator, EmulatorConfig, Faults};
use volumed::cloudstack::sign;

const API_KEY: &str = "test-api-key";
const SECRET: &str = "test-secret-key";
const MIB: u64 = 1 << 20;

struct Cloud {
    emulator: Emulator,
    base: String,
    http: reqwest::Client,
    appliance: Uuid,
    device_dir: PathBuf,
    data_dir: PathBuf,
    _dir: TempDir,
}

/// `expires` in CloudStack's format, `secs` from now.
fn expires_in(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs))
        .format("%Y-%m-%dT%H:%M:%S%z")
        .to_string()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The standard parameters of a signed request plus the command's own.
fn request(command: &str, args: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut params = pairs(&[
        ("command", command),
        ("apiKey", API_KEY),
        ("response", "json"),
        ("signatureversion", "3"),
    ]);
    params.push(("expires".into(), expires_in(600)));
    params.extend(pairs(args));
    params
}

async fn start(latency_ms: u64) -> Cloud {
    let dir = TempDir::new().expect("temporary directory");
    let appliance = Uuid::new_v4();
    let device_dir = dir.path().join("by-id");
    let data_dir = dir.path().join("data");
    let (emulator, addr, _task) = Emulator::spawn(EmulatorConfig {
        api_key: API_KEY.into(),
        secret_key: SECRET.into(),
        appliance_vm: appliance,
        device_dir: device_dir.clone(),
        data_dir: data_dir.clone(),
        job_latency: Duration::from_millis(latency_ms),
    })
    .await
    .expect("emulator starts");
    assert_eq!(emulator.url(), format!("http://{addr}/client/api"));
    Cloud {
        emulator,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        appliance,
        device_dir,
        data_dir,
        _dir: dir,
    }
}

impl Cloud {
    /// GETs `/client/api?<query>`; returns the HTTP status and JSON body.
    async fn get_raw(&self, query: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}/client/api?{query}", self.base))
            .send()
            .await
            .expect("API request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON answer"))
    }

    /// A correctly signed GET.
    async fn call(&self, command: &str, args: &[(&str, &str)]) -> (u16, Value) {
        self.get_raw(&sign::signed_query(&request(command, args), SECRET))
            .await
    }

    /// A signed call that must succeed.
    async fn ok(&self, command: &str, args: &[(&str, &str)]) -> Value {
        let (status, body) = self.call(command, args).await;
        assert_eq!(status, 200, "{command}: {body}");
        body
    }

    async fn start_job(&self, command: &str, args: &[(&str, &str)]) -> String {
        let body = self.ok(command, args).await;
        let key = format!("{}response", command.to_lowercase());
        body[key]["jobid"].as_str().expect("jobid").to_string()
    }

    async fn attach(&self, volume: Uuid, vm: Uuid) -> String {
        self.start_job(
            "attachVolume",
            &[
                ("id", &volume.to_string()),
                ("virtualmachineid", &vm.to_string()),
            ],
        )
        .await
    }

    async fn detach(&self, volume: Uuid) -> String {
        self.start_job("detachVolume", &[("id", &volume.to_string())])
            .await
    }

    async fn job(&self, job: &str) -> Value {
        let body = self.ok("queryAsyncJobResult", &[("jobid", job)]).await;
        body["queryasyncjobresultresponse"].clone()
    }

    /// Polls the job until it is no longer pending.
    async fn wait_job(&self, job: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.job(job).await;
            if answer["jobstatus"] != 0 {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job} still pending"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn volume(&self, volume: Uuid) -> Value {
        let body = self.ok("listVolumes", &[("id", &volume.to_string())]).await;
        assert_eq!(body["listvolumesresponse"]["count"], 1, "{body}");
        body["listvolumesresponse"]["volume"][0].clone()
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON answer"))
    }
}

fn assert_rejected(status: u16, body: &Value) {
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        *body,
        json!({"errorresponse": {
            "errorcode": 401,
            "errortext": "unable to verify user credentials and/or request signature"
        }})
    );
}

fn assert_failed_job(answer: &Value) {
    assert_eq!(answer["jobstatus"], 2, "{answer}");
    assert_eq!(answer["jobresultcode"], 530, "{answer}");
    assert_eq!(answer["jobresult"]["errorcode"], 530, "{answer}");
    assert!(
        answer["jobresult"]["errortext"].as_str().is_some(),
        "{answer}"
    );
}

#[tokio::test]
async fn signed_list_volumes_by_get_and_post() {
    let cloud = start(50).await;
    let body = cloud.ok("listVolumes", &[]).await;
    assert_eq!(body, json!({"listvolumesresponse": {}}));

    let a = cloud.emulator.create_volume(MIB).expect("volume");
    let b = cloud.emulator.create_volume(2 * MIB).expect("volume");
    let body = cloud.ok("listVolumes", &[]).await;
    let list = &body["listvolumesresponse"];
    assert_eq!(list["count"], 2);
    assert_eq!(list["volume"][0]["id"], a.to_string());
    assert_eq!(list["volume"][1]["id"], b.to_string());
    let v = &list["volume"][1];
    assert_eq!(v["size"], 2 * MIB);
    assert_eq!(v["state"], "Ready");
    assert_eq!(v["type"], "DATADISK");
    assert!(v["name"].is_string());
    assert!(v.get("virtualmachineid").is_none());

    // The same request as a form POST, filtered by id.
    let query = sign::signed_query(&request("listVolumes", &[("id", &b.to_string())]), SECRET);
    let resp = cloud
        .http
        .post(format!("{}/client/api", cloud.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(query)
        .send()
        .await
        .expect("form POST");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("JSON answer");
    assert_eq!(body["listvolumesresponse"]["count"], 1);
    assert_eq!(
        body["listvolumesresponse"]["volume"][0]["id"],
        b.to_string()
    );

    // An RFC 3339 `expires` is accepted too.
    let mut params = request("listVolumes", &[]);
    params.retain(|(n, _)| n != "expires");
    let later = chrono::Utc::now() + chrono::Duration::minutes(5);
    params.push(("expires".into(), later.to_rfc3339()));
    let (status, _) = cloud.get_raw(&sign::signed_query(&params, SECRET)).await;
    assert_eq!(status, 200);

    // The appliance VM exists from the start.
    let body = cloud.ok("listVirtualMachines", &[]).await;
    let vms = &body["listvirtualmachinesresponse"];
    assert_eq!(vms["count"], 1);
    assert_eq!(vms["virtualmachine"][0]["id"], cloud.appliance.to_string());
    assert_eq!(vms["virtualmachine"][0]["state"], "Running");

    assert_eq!(cloud.emulator.rejected_signatures(), 0);
    assert_eq!(cloud.emulator.calls_by_command()["listVolumes"], 4);
}

/// HMAC-SHA1 over what a client that sorts names case-insensitively signs.
fn case_insensitive_signature(params: &[(String, String)], secret: &str) -> String {
    let mut sorted: Vec<_> = params.to_vec();
    sorted.sort_by_key(|(n, _)| n.to_lowercase());
    let text = sorted
        .iter()
        .map(|(n, v)| format!("{n}={}", sign::encode(v)))
        .collect::<Vec<_>>()
        .join("&")
        .to_lowercase();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn bad_credentials_are_rejected_with_401_and_counted() {
    let cloud = start(50).await;
    let volume = cloud
        .emulator
        .create_volume(MIB)
        .expect("volume")
        .to_string();
    let mut expected = 0;

    // Wrong secret.
    let (status, body) = cloud
        .get_raw(&sign::signed_query(
            &request("listVolumes", &[]),
            "not-the-secret",
        ))
        .await;
    assert_rejected(status, &body);
    expected += 1;

    // A parameter changed after signing.
    let query = sign::signed_query(&request("listVolumes", &[("id", &volume)]), SECRET);
    let tampered = query.replace(&volume, &Uuid::new_v4().to_string());
    assert_ne!(query, tampered);
    let (status, body) = cloud.get_raw(&tampered).await;
    assert_rejected(status, &body);
    expected += 1;

    // Expired, though correctly signed.
    let mut params = request("listVolumes", &[]);
    params.retain(|(n, _)| n != "expires");
    params.push(("expires".into(), expires_in(-60)));
    let (status, body) = cloud.get_raw(&sign::signed_query(&params, SECRET)).await;
    assert_rejected(status, &body);
    expected += 1;

    // signatureversion=3 without expires.
    params.retain(|(n, _)| n != "expires");
    let (status, body) = cloud.get_raw(&sign::signed_query(&params, SECRET)).await;
    assert_rejected(status, &body);
    expected += 1;

    // Unknown API key, correctly signed.
    let mut params = request("listVolumes", &[]);
    for (n, v) in params.iter_mut() {
        if n == "apiKey" {
            *v = "someone-else".into();
        }
    }
    let (status, body) = cloud.get_raw(&sign::signed_query(&params, SECRET)).await;
    assert_rejected(status, &body);
    expected += 1;

    // No signature at all.
    let (status, body) = cloud
        .get_raw(&format!(
            "command=listVolumes&apiKey={API_KEY}&response=json"
        ))
        .await;
    assert_rejected(status, &body);
    expected += 1;

    // Signed after a case-insensitive sort of mixed-case names: `Zebra`
    // sorts after `apple` that way, before it in CloudStack's order.
    let params = request("listVolumes", &[("Zebra", "z"), ("apple", "a")]);
    let wrong = case_insensitive_signature(&params, SECRET);
    assert_ne!(wrong, sign::signature(&params, SECRET));
    let query = params
        .iter()
        .map(|(n, v)| format!("{n}={}", sign::encode(v)))
        .chain([format!("signature={}", sign::encode(&wrong))])
        .collect::<Vec<_>>()
        .join("&");
    let (status, body) = cloud.get_raw(&query).await;
    assert_rejected(status, &body);
    expected += 1;
    // The same parameters signed in CloudStack's order pass.
    let (status, body) = cloud.get_raw(&sign::signed_query(&params, SECRET)).await;
    assert_eq!(status, 200, "{body}");

    assert_eq!(cloud.emulator.rejected_signatures(), expected);
    // Rejected requests are not counted as calls.
    assert_eq!(cloud.emulator.calls_by_command()["listVolumes"], 1);
    let (_, stats) = cloud
        .admin(reqwest::Method::GET, "/admin/stats", None)
        .await;
    assert_eq!(stats["rejected_signatures"], expected);
}

#[tokio::test]
async fn attach_and_detach_jobs_move_the_device_link() {
    let cloud = start(300).await;
    let volume = cloud.emulator.create_volume(4 * MIB).expect("volume");
    let backing = cloud.data_dir.join(format!("{volume}.img"));
    assert_eq!(
        std::fs::metadata(&backing).expect("backing file").len(),
        4 * MIB
    );
    let link = cloud
        .device_dir
        .join(format!("virtio-{}", virtio_serial(volume)));
    assert_eq!(cloud.emulator.device_link(volume), link);

    let job = cloud.attach(volume, cloud.appliance).await;
    let pending = cloud.job(&job).await;
    assert_eq!(pending["jobstatus"], 0, "{pending}");
    assert_eq!(pending["jobresultcode"], 0);
    assert_eq!(pending["jobprocstatus"], 0);
    assert_eq!(pending["jobid"], job);
    assert_eq!(
        pending["cmd"],
        "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd"
    );
    assert!(pending.get("jobresult").is_none());
    assert!(
        chrono::DateTime::parse_from_rfc3339(pending["created"].as_str().expect("created")).is_ok()
    );

    let done = cloud.wait_job(&job).await;
    assert_eq!(done["jobstatus"], 1, "{done}");
    assert_eq!(done["jobresultcode"], 0);
    assert_eq!(done["jobresulttype"], "object");
    let v = &done["jobresult"]["volume"];
    assert_eq!(v["id"], volume.to_string());
    assert_eq!(v["virtualmachineid"], cloud.appliance.to_string());
    assert_eq!(v["deviceid"], 1);
    assert_eq!(std::fs::read_link(&link).expect("device link"), backing);
    assert_eq!(cloud.emulator.attached_to(volume), Some(cloud.appliance));

    let listed = cloud.volume(volume).await;
    assert_eq!(listed["virtualmachineid"], cloud.appliance.to_string());
    assert_eq!(listed["vmname"], "volumed-appliance");
    assert_eq!(listed["deviceid"], 1);

    // Attaching it again, anywhere, is refused at once.
    let (status, body) = cloud
        .call(
            "attachVolume",
            &[
                ("id", &volume.to_string()),
                ("virtualmachineid", &cloud.appliance.to_string()),
            ],
        )
        .await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(body["attachvolumeresponse"]["errorcode"], 431);
    assert_eq!(body["attachvolumeresponse"]["cserrorcode"], 4350);
    assert_eq!(body["attachvolumeresponse"]["uuidList"], json!([]));

    let job2 = cloud.detach(volume).await;
    let done = cloud.wait_job(&job2).await;
    assert_eq!(done["jobstatus"], 1, "{done}");
    assert_eq!(
        done["cmd"],
        "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd"
    );
    assert!(done["jobresult"]["volume"]
        .get("virtualmachineid")
        .is_none());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link still there"
    );
    assert_eq!(cloud.emulator.attached_to(volume), None);
    let listed = cloud.volume(volume).await;
    assert!(listed.get("virtualmachineid").is_none(), "{listed}");
    assert!(listed.get("deviceid").is_none(), "{listed}");

    // Detaching a detached volume is refused at once.
    let (status, body) = cloud
        .call("detachVolume", &[("id", &volume.to_string())])
        .await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(body["detachvolumeresponse"]["errorcode"], 431);

    let calls = cloud.emulator.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (
            calls[0].command.as_str(),
            calls[0].volume_id,
            calls[0].vm_id
        ),
        ("attachVolume", volume, cloud.appliance)
    );
    assert_eq!(calls[0].job_id.to_string(), job);
    assert_eq!(
        (
            calls[1].command.as_str(),
            calls[1].volume_id,
            calls[1].vm_id
        ),
        ("detachVolume", volume, cloud.appliance)
    );
    assert_eq!(calls[1].job_id.to_string(), job2);
    assert_eq!(cloud.emulator.max_in_flight_per_vm(), 1);
}

#[tokio::test]
async fn device_ids_skip_the_cdrom_and_other_vms_get_no_link() {
    let cloud = start(20).await;
    let other = Uuid::new_v4();
    cloud.emulator.create_vm(other, "other");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let volume = cloud.emulator.create_volume(MIB).expect("volume");
        let done = cloud.wait_job(&cloud.attach(volume, other).await).await;
        assert_eq!(done["jobstatus"], 1, "{done}");
        ids.push(
            done["jobresult"]["volume"]["deviceid"]
                .as_u64()
                .expect("deviceid"),
        );
        assert_eq!(done["jobresult"]["volume"]["vmname"], "other");
        assert!(std::fs::symlink_metadata(cloud.emulator.device_link(volume)).is_err());
    }
    assert_eq!(ids, [1, 2, 4]);

    // A requested device id is honoured.
    let volume = cloud.emulator.create_volume(MIB).expect("volume");
    let job = cloud
        .start_job(
            "attachVolume",
            &[
                ("id", &volume.to_string()),
                ("virtualmachineid", &cloud.appliance.to_string()),
                ("deviceid", "7"),
            ],
        )
        .await;
    let done = cloud.wait_job(&job).await;
    assert_eq!(done["jobresult"]["volume"]["deviceid"], 7, "{done}");
}

#[tokio::test]
async fn unknown_things_are_parameter_errors_and_unknown_commands_432() {
    let cloud = start(20).await;
    let volume = cloud
        .emulator
        .create_volume(MIB)
        .expect("volume")
        .to_string();
    let nobody = Uuid::new_v4().to_string();

    for args in [
        vec![
            ("id", nobody.as_str()),
            ("virtualmachineid", volume.as_str()),
        ],
        vec![
            ("id", volume.as_str()),
            ("virtualmachineid", nobody.as_str()),
        ],
        vec![("id", volume.as_str())],
        vec![("id", "not-a-uuid"), ("virtualmachineid", nobody.as_str())],
    ] {
        let (status, body) = cloud.call("attachVolume", &args).await;
        assert_eq!(status, 431, "{args:?}: {body}");
    }
    let (status, _) = cloud.call("listVolumes", &[("id", &nobody)]).await;
    assert_eq!(status, 431);
    let (status, body) = cloud
        .call("queryAsyncJobResult", &[("jobid", &nobody)])
        .await;
    assert_eq!(status, 431);
    assert_eq!(body["queryasyncjobresultresponse"]["errorcode"], 431);
    let (status, body) = cloud.call("deployVirtualMachine", &[]).await;
    assert_eq!(status, 432, "{body}");
    assert_eq!(body["deployvirtualmachineresponse"]["errorcode"], 432);
    assert!(cloud.emulator.calls().is_empty());
}

#[tokio::test]
async fn failed_jobs_have_no_effect() {
    let cloud = start(20).await;
    let volume = cloud.emulator.create_volume(MIB).expect("volume");
    cloud.emulator.set_faults(Faults {
        fail_jobs: Some(1),
        ..Faults::default()
    });
    let answer = cloud
        .wait_job(&cloud.attach(volume, cloud.appliance).await)
        .await;
    assert_failed_job(&answer);
    assert_eq!(cloud.emulator.attached_to(volume), None);
    assert!(std::fs::symlink_metadata(cloud.emulator.device_link(volume)).is_err());
    assert!(cloud.volume(volume).await.get("virtualmachineid").is_none());

    // The fault is used up: the retry succeeds.
    let answer = cloud
        .wait_job(&cloud.attach(volume, cloud.appliance).await)
        .await;
    assert_eq!(answer["jobstatus"], 1, "{answer}");
    assert_eq!(cloud.emulator.faults().fail_jobs, Some(0));
}

#[tokio::test]
async fn late_success_reports_failure_but_takes_effect() {
    let cloud = start(20).await;
    let volume = cloud.emulator.create_volume(MIB).expect("volume");
    let link = cloud.emulator.device_link(volume);
    cloud.emulator.set_faults(Faults {
        late_success_jobs: Some(2),
        ..Faults::default()
    });

    let answer = cloud
        .wait_job(&cloud.attach(volume, cloud.appliance).await)
        .await;
    assert_failed_job(&answer);
    assert_eq!(cloud.emulator.attached_to(volume), Some(cloud.appliance));
    assert!(std::fs::read_link(&link).is_ok());
    assert_eq!(
        cloud.volume(volume).await["virtualmachineid"],
        cloud.appliance.to_string()
    );

    let answer = cloud.wait_job(&cloud.detach(volume).await).await;
    assert_failed_job(&answer);
    assert_eq!(cloud.emulator.attached_to(volume), None);
    assert!(std::fs::symlink_metadata(&link).is_err());
}

#[tokio::test]
async fn stuck_jobs_stay_pending() {
    let cloud = start(50).await;
    let other = Uuid::new_v4();
    cloud.emulator.create_vm(other, "other");
    let stuck = cloud.emulator.create_volume(MIB).expect("volume");
    let normal = cloud.emulator.create_volume(MIB).expect("volume");
    cloud.emulator.set_faults(Faults {
        stuck_jobs: Some(1),
        ..Faults::default()
    });
    let stuck_job = cloud.attach(stuck, cloud.appliance).await;
    // Accepted later with the same latency, so it ends after the stuck job
    // would have.
    let later = cloud.wait_job(&cloud.attach(normal, other).await).await;
    assert_eq!(later["jobstatus"], 1, "{later}");

    let answer = cloud.job(&stuck_job).await;
    assert_eq!(answer["jobstatus"], 0, "{answer}");
    assert!(answer.get("jobresult").is_none());
    assert_eq!(cloud.emulator.attached_to(stuck), None);
    assert!(std::fs::symlink_metadata(cloud.emulator.device_link(stuck)).is_err());
}

#[tokio::test]
async fn http_530_burst_hits_any_command_after_the_signature_check() {
    let cloud = start(20).await;
    cloud.emulator.set_faults(Faults {
        http_530_calls: Some(2),
        ..Faults::default()
    });
    // A rejected request does not use up the burst.
    let (status, _) = cloud
        .get_raw(&sign::signed_query(&request("listVolumes", &[]), "wrong"))
        .await;
    assert_eq!(status, 401);

    let (status, body) = cloud.call("listVolumes", &[]).await;
    assert_eq!(status, 530, "{body}");
    assert_eq!(body["listvolumesresponse"]["errorcode"], 530);
    assert_eq!(body["listvolumesresponse"]["cserrorcode"], 4350);
    let (status, body) = cloud
        .call(
            "queryAsyncJobResult",
            &[("jobid", &Uuid::new_v4().to_string())],
        )
        .await;
    assert_eq!(status, 530, "{body}");
    assert_eq!(body["queryasyncjobresultresponse"]["errorcode"], 530);
    let (status, _) = cloud.call("listVolumes", &[]).await;
    assert_eq!(status, 200);

    let counts = cloud.emulator.calls_by_command();
    assert_eq!(counts["listVolumes"], 2);
    assert_eq!(counts["queryAsyncJobResult"], 1);
}

#[tokio::test]
async fn param_error_burst_hits_attach_and_detach_only() {
    let cloud = start(20).await;
    let volume = cloud.emulator.create_volume(MIB).expect("volume");
    cloud.emulator.set_faults(Faults {
        param_error_calls: Some(1),
        ..Faults::default()
    });
    // Other commands leave the counter alone.
    cloud.ok("listVolumes", &[]).await;
    let args = [
        ("id", volume.to_string()),
        ("virtualmachineid", cloud.appliance.to_string()),
    ];
    let args: Vec<(&str, &str)> = args.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, body) = cloud.call("attachVolume", &args).await;
    assert_eq!(status, 431, "{body}");
    assert_eq!(body["attachvolumeresponse"]["errorcode"], 431);
    assert!(cloud.emulator.calls().is_empty());

    let answer = cloud
        .wait_job(&cloud.attach(volume, cloud.appliance).await)
        .await;
    assert_eq!(answer["jobstatus"], 1, "{answer}");
    assert_eq!(cloud.emulator.calls().len(), 1);
}

#[tokio::test]
async fn concurrent_attaches_to_one_vm_collide_when_asked() {
    let cloud = start(300).await;
    let vm = Uuid::new_v4();
    cloud.emulator.create_vm(vm, "busy");
    let a = cloud.emulator.create_volume(MIB).expect("volume");
    let b = cloud.emulator.create_volume(MIB).expect("volume");

    // Without the fault, overlapping attaches both succeed.
    let (ja, jb) = (cloud.attach(a, vm).await, cloud.attach(b, vm).await);
    assert_eq!(cloud.wait_job(&ja).await["jobstatus"], 1);
    assert_eq!(cloud.wait_job(&jb).await["jobstatus"], 1);
    assert_eq!(cloud.emulator.max_in_flight_per_vm(), 2);
    for v in [a, b] {
        assert_eq!(cloud.wait_job(&cloud.detach(v).await).await["jobstatus"], 1);
    }

    cloud.emulator.set_faults(Faults {
        collide_concurrent_attaches: Some(true),
        ..Faults::default()
    });
    let (ja, jb) = (cloud.attach(a, vm).await, cloud.attach(b, vm).await);
    let first = cloud.wait_job(&ja).await;
    let second = cloud.wait_job(&jb).await;
    assert_eq!(first["jobstatus"], 1, "{first}");
    assert_failed_job(&second);
    assert!(
        second["jobresult"]["errortext"]
            .as_str()
            .expect("errortext")
            .contains("device id collision"),
        "{second}"
    );
    assert_eq!(cloud.emulator.attached_to(a), Some(vm));
    assert_eq!(cloud.emulator.attached_to(b), None);
    assert_eq!(cloud.emulator.max_in_flight_per_vm(), 2);

    // One at a time is fine even with the fault on.
    let answer = cloud.wait_job(&cloud.attach(b, vm).await).await;
    assert_eq!(answer["jobstatus"], 1, "{answer}");
}

#[tokio::test]
async fn admin_endpoints() {
    let cloud = start(20).await;
    let id = Uuid::new_v4();
    let (status, body) = cloud
        .admin(
            reqwest::Method::POST,
            "/admin/volumes",
            Some(json!({"id": id, "name": "disk-1", "size": 3 * MIB})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], id.to_string());
    let (status, _) = cloud
        .admin(
            reqwest::Method::POST,
            "/admin/volumes",
            Some(json!({"id": id, "size": MIB})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = cloud
        .admin(
            reqwest::Method::POST,
            "/admin/volumes",
            Some(json!({"size": MIB})),
        )
        .await;
    assert_eq!(status, 201);
    let generated: Uuid = body["id"].as_str().expect("id").parse().expect("a UUID");

    let vm = Uuid::new_v4();
    let (status, _) = cloud
        .admin(
            reqwest::Method::POST,
            "/admin/vms",
            Some(json!({"id": vm, "name": "worker"})),
        )
        .await;
    assert_eq!(status, 201);

    let (status, body) = cloud
        .admin(
            reqwest::Method::PUT,
            "/admin/faults",
            Some(json!({"fail_jobs": 3, "collide_concurrent_attaches": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["fail_jobs"], 3);
    assert_eq!(body["collide_concurrent_attaches"], true);
    assert_eq!(body["job_latency_ms"], 20);
    assert_eq!(cloud.emulator.faults().fail_jobs, Some(3));
    cloud
        .admin(
            reqwest::Method::PUT,
            "/admin/faults",
            Some(json!({"fail_jobs": 0})),
        )
        .await;

    let job = cloud.attach(id, vm).await;
    cloud.wait_job(&job).await;
    let (_, body) = cloud
        .admin(reqwest::Method::GET, "/admin/calls", None)
        .await;
    let calls: Vec<Call> = serde_json::from_value(body).expect("calls");
    assert_eq!(calls, cloud.emulator.calls());
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].volume_id, calls[0].vm_id), (id, vm));

    let (_, body) = cloud
        .admin(reqwest::Method::GET, "/admin/volumes", None)
        .await;
    let volumes = body.as_array().expect("a list");
    assert_eq!(volumes.len(), 2);
    assert_eq!(volumes[0]["name"], "disk-1");
    assert_eq!(volumes[0]["size"], 3 * MIB);
    assert_eq!(volumes[0]["virtualmachineid"], vm.to_string());
    assert_eq!(volumes[0]["vmname"], "worker");
    assert_eq!(volumes[1]["id"], generated.to_string());

    let (_, stats) = cloud
        .admin(reqwest::Method::GET, "/admin/stats", None)
        .await;
    assert_eq!(stats["max_in_flight_per_vm"], 1);
    assert_eq!(stats["max_in_flight_total"], 1);
    assert_eq!(stats["rejected_signatures"], 0);
    assert_eq!(stats["calls_by_command"]["attachVolume"], 1);
}
