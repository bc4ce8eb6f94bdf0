//! Transport security: `amqps://` with a private CA and a client
//! certificate, and PostgreSQL `sslmode`, against real TLS endpoints (an
//! `openssl s_server` standing in for the broker's TLS listener, and the
//! local PostgreSQL, which serves TLS).

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use volumed::config::{Config, SecretUrl};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl not runnable ({e}); scripts/ensure-services.sh installs it")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and a client certificate for
/// host `oma-1` in a PKCS#12 bundle with password `s3cret`.
fn make_pki(dir: &Path) {
    let subj = |cn: &str| format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            &subj("volumed test CA"),
        ],
    );
    for (name, cn) in [("server", "localhost"), ("client", "oma-1")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &subj(cn),
            ],
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("ext file");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
    }
    openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-in",
            "client.pem",
            "-inkey",
            "client.key",
            "-out",
            "client.p12",
            "-passout",
            "pass:s3cret",
        ],
    );
}

/// An `openssl s_server` with the CA's localhost certificate, printing what
/// it receives.
struct TlsServer {
    child: std::process::Child,
    port: u16,
    output: Arc<Mutex<Vec<u8>>>,
}

impl TlsServer {
    /// Demands a client certificate signed by the CA and accepts one
    /// connection.
    fn start(dir: &Path) -> TlsServer {
        TlsServer::spawn(dir, &["-CAfile", "ca.pem", "-Verify", "1", "-naccept", "1"])
    }

    /// Answers every HTTPS request with its status page (`-www`), asking for
    /// no client certificate.
    fn www(dir: &Path) -> TlsServer {
        TlsServer::spawn(dir, &["-www"])
    }

    fn spawn(dir: &Path, extra: &[&str]) -> TlsServer {
        let port = common::free_port();
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                "server.pem",
                "-key",
                "server.key",
            ])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_server starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let out = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().expect("output").extend_from_slice(&buf[..n]);
                }
            });
        }
        let server = TlsServer {
            child,
            port,
            output,
        };
        server.wait_for("ACCEPT");
        server
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output")).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s_server never printed {needle:?}: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(vars: &[(&str, String)]) -> anyhow::Result<Config> {
    let map: std::collections::HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .chain([("VOLUMED_HOST_ID".to_string(), "oma-1".to_string())])
        .collect();
    Config::load_with(None, &move |k| map.get(k).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_with_the_ca_and_presents_the_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path());
    let path = |f: &str| dir.path().join(f).display().to_string();

    // With the CA and the client bundle: the TLS handshake completes (the
    // server verified our certificate) and the AMQP protocol header
    // arrives through the tunnel.
    let server = TlsServer::start(dir.path());
    let url = format!("amqps://guest:guest@localhost:{}/%2f", server.port);
    let cfg = config(&[
        ("VOLUMED_AMQP_URL", url.clone()),
        ("VOLUMED_AMQP_CA_FILE", path("ca.pem")),
        ("VOLUMED_AMQP_CLIENT_CERT", path("client.p12")),
        ("VOLUMED_AMQP_CLIENT_CERT_PASSWORD", "s3cret".into()),
    ])
    .expect("TLS settings load");
    let shown = format!("{cfg:?}\n{}", cfg.render());
    assert!(!shown.contains("s3cret"), "password shown: {shown}");
    let connect = tokio::spawn(async move {
        volumed::amqp::connect_with(&cfg.amqp_url, &cfg.amqp_tls, "tls-test").await
    });
    server.wait_for("AMQP");
    let text = server.text();
    assert!(
        text.contains("CN = oma-1") || text.contains("CN=oma-1"),
        "{text}"
    );
    connect.abort();
    drop(server);

    // Without the CA, the broker's certificate is refused.
    let server = TlsServer::start(dir.path());
    let url = SecretUrl::new(format!("amqps://guest:guest@localhost:{}/%2f", server.port));
    let err = volumed::amqp::connect(&url, "tls-test")
        .await
        .expect_err("an unknown CA is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.to_lowercase().contains("certificate") || msg.contains("UnknownIssuer"),
        "{msg}"
    );
    assert!(!server.text().contains("AMQP"), "nothing sent in clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudstack_is_reached_over_verified_tls() {
    use volumed::cloudstack::client::{Client, CsError};

    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path());
    let ca = dir.path().join("ca.pem").display().to_string();
    let server = TlsServer::www(dir.path());
    let url = format!("https://127.0.0.1:{}/client/api", server.port);
    let client = |extra: &[(&str, String)]| {
        let mut vars = vec![
            ("VOLUMED_BACKEND", "cloudstack".to_owned()),
            ("VOLUMED_CLOUDSTACK_URL", url.clone()),
            ("VOLUMED_CLOUDSTACK_API_KEY", "key".into()),
            ("VOLUMED_CLOUDSTACK_SECRET_KEY", "secret".into()),
            ("VOLUMED_CLOUDSTACK_TIMEOUT_SECS", "10".into()),
        ];
        vars.extend(extra.iter().cloned());
        let cfg = config(&vars).expect("CloudStack settings load");
        Client::new(cfg.cloudstack.as_ref().expect("the CloudStack backend")).expect("client built")
    };
    // `call` sends one request: the read helpers would retry a transport
    // error, which says nothing more here.
    let list = |c: Client| async move {
        c.call("listVolumes", &[("listall", "true".into())])
            .await
            .expect_err("s_server does not speak the CloudStack API")
    };
    let is_cert_error = |e: &CsError| e.to_string().to_lowercase().contains("certificate");

    // Verification is on by default, and the private CA is not among the
    // system's roots: the handshake fails on the server's certificate.
    let err = list(client(&[])).await;
    assert!(
        matches!(err, CsError::Transport(_)) && is_cert_error(&err),
        "expected a certificate error, got {err:?}"
    );
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // With the CA trusted, the handshake completes and s_server's HTML
    // status page arrives, which is not a CloudStack JSON answer.
    let err = list(client(&[("VOLUMED_CLOUDSTACK_CA_FILE", ca.clone())])).await;
    assert!(
        matches!(err, CsError::Decode(_)) && !is_cert_error(&err),
        "expected the HTTP answer to be read, got {err:?}"
    );

    // With verification off, the unknown issuer does not matter either.
    let err = list(client(&[("VOLUMED_CLOUDSTACK_TLS_VERIFY", "false".into())])).await;
    assert!(
        matches!(err, CsError::Decode(_)) && !is_cert_error(&err),
        "expected the HTTP answer to be read, got {err:?}"
    );
}

#[test]
fn tls_settings_are_checked_at_load() {
    let err = config(&[
        ("VOLUMED_AMQP_URL", "amqp://mq/%2f".into()),
        ("VOLUMED_AMQP_CA_FILE", "/etc/hostname".into()),
    ])
    .expect_err("a CA file with amqp://");
    assert!(format!("{err:#}").contains("amqps://"), "{err:#}");
    let err = config(&[
        ("VOLUMED_AMQP_URL", "amqps://mq/%2f".into()),
        ("VOLUMED_AMQP_CA_FILE", "/nonexistent/ca.pem".into()),
    ])
    .expect_err("a missing CA file");
    assert!(format!("{err:#}").contains("VOLUMED_AMQP_CA_FILE=/nonexistent/ca.pem"));
    let err = config(&[
        ("VOLUMED_AMQP_URL", "amqps://mq/%2f".into()),
        ("VOLUMED_AMQP_CA_FILE", "/etc/hostname".into()),
    ])
    .expect_err("not PEM");
    assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
}

#[tokio::test]
async fn postgres_sslmode_is_honoured() {
    let base = "postgres://postgres@127.0.0.1:5432/postgres";
    // require: encrypted (the local server has TLS on, as Debian sets it up).
    let pool = volumed::db::connect(&SecretUrl::new(format!("{base}?sslmode=require")), 1)
        .await
        .expect("TLS connection");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "sslmode=require gave a clear-text connection");
    pool.close().await;
    // disable: clear text.
    let pool = volumed::db::connect(&SecretUrl::new(format!("{base}?sslmode=disable")), 1)
        .await
        .expect("plain connection");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(!ssl);
    pool.close().await;
    // verify-full: the server's self-signed certificate is not trusted.
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        volumed::db::connect(&SecretUrl::new(format!("{base}?sslmode=verify-full")), 1),
    )
    .await
    .expect("an answer");
    assert!(r.is_err(), "an untrusted server certificate was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_works_with_a_broker_user_limited_to_its_own_queues() {
    const HOST: &str = "oma-s.1";
    let env = common::Env::new("perms").await;
    let user = common::BrokerUser(format!("{}_user", env.name));
    common::rabbitmqctl(&["add_user", &user.0, "pw"]);
    let p = volumed::topology::Permissions::for_host(HOST);
    common::rabbitmqctl(&[
        "set_permissions",
        "-p",
        &env.vhost,
        &user.0,
        &p.configure,
        &p.write,
        &p.read,
    ]);
    let url = format!("amqp://{}:pw@127.0.0.1:5672/{}", user.0, env.vhost);
    // One transient failure: the retry path (publish to volumed.retry) is
    // exercised too.
    let _d = env.start(
        HOST,
        &[
            ("VOLUMED_AMQP_URL", url.as_str()),
            ("VOLUMED_FAILPOINTS", "local_backend_unavailable=fail:1"),
            ("VOLUMED_RETRY_DELAYS", "100ms"),
        ],
    );
    let client = env.client().await;
    let mut events = client.subscribe("#").await.expect("subscribed");
    let vol = env.create_volume(HOST);
    let ev = client
        .attach_and_wait(HOST, vol, env.appliance, true, common::WAIT)
        .await
        .expect("the reply arrives (amq.default)");
    assert!(ev.event_type.succeeded(), "{ev:?}");
    assert_eq!(ev.attempts, 2, "retried once");
    events
        .wait_for(ev.request_id, common::WAIT)
        .await
        .expect("published on volumed.events");
    // A refused request reaches the dead-letter store.
    client
        .publish_raw(HOST, b"not json", Some(uuid::Uuid::new_v4()), None)
        .await
        .expect("published");
    env.wait_count("SELECT count(*) FROM dead_letters", 1).await;

    // The user can neither read nor delete another host's queue.
    let other = volumed::topology::request_queue("oma-other");
    let admin = volumed::amqp::connect(&env.amqp_url, "test")
        .await
        .expect("guest");
    let ch = admin.create_channel().await.expect("channel");
    ch.queue_declare(&other, Default::default(), Default::default())
        .await
        .expect("declared");
    let limited = volumed::amqp::connect(&SecretUrl::new(url), "test")
        .await
        .expect("the user connects");
    let ch = limited.create_channel().await.expect("channel");
    let err = ch
        .basic_get(&other, Default::default())
        .await
        .expect_err("another host's queue is not readable");
    assert!(format!("{err}").contains("ACCESS_REFUSED"), "{err}");
    let ch = limited.create_channel().await.expect("channel");
    let err = ch
        .queue_delete(&other, Default::default())
        .await
        .expect_err("another host's queue cannot be deleted");
    assert!(format!("{err}").contains("ACCESS_REFUSED"), "{err}");
    client.close().await;
}

/// A PostgreSQL login role for one test, dropped when the test ends (after
/// its database, which holds the role's grants: declare it first).
struct PgRole(String);

impl PgRole {
    fn create() -> PgRole {
        let name = format!("vt_dml_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        common::psql(&format!("CREATE ROLE {name} LOGIN"));
        PgRole(name)
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        common::psql_best_effort(&format!("DROP ROLE IF EXISTS {}", self.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_works_with_a_database_role_that_cannot_change_the_schema() {
    const HOST: &str = "oma-db";
    let role = PgRole::create();
    let env = common::Env::new("dbrole").await;
    let r = &role.0;
    for sql in [
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT USAGE ON SCHEMA public TO {r}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {r}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {r}"),
        format!("REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM {r}"),
    ] {
        sqlx::query(&sql).execute(&env.pool).await.expect(&sql);
    }
    let url = format!("postgres://{r}@127.0.0.1:5432/{}", env.name);

    // By default the daemon migrates at start-up, which needs DDL.
    let mut d = env.spawn(HOST, &[("VOLUMED_DATABASE_URL", url.as_str())]);
    assert!(!d.wait_exit(common::WAIT).success());
    assert!(
        d.log().join("\n").contains("permission denied"),
        "{}",
        d.log().join("\n")
    );

    // With VOLUMED_DATABASE_MIGRATE=false it only checks the schema: a
    // schema behind the build is refused...
    let off = [
        ("VOLUMED_DATABASE_URL", url.as_str()),
        ("VOLUMED_DATABASE_MIGRATE", "false"),
    ];
    let latest = "(SELECT max(version) FROM _sqlx_migrations)";
    sqlx::query(&format!(
        "UPDATE _sqlx_migrations SET success = false WHERE version = {latest}"
    ))
    .execute(&env.pool)
    .await
    .expect("mark the latest migration unapplied");
    let mut d = env.spawn(HOST, &off);
    assert!(!d.wait_exit(common::WAIT).success());
    let log = d.log().join("\n");
    assert!(log.contains("volumed migrate"), "{log}");
    sqlx::query(&format!(
        "UPDATE _sqlx_migrations SET success = true WHERE version = {latest} OR NOT success"
    ))
    .execute(&env.pool)
    .await
    .expect("restore");

    // ...and a current one works with DML rights alone.
    let _d = env.start(HOST, &off);
    let client = env.client().await;
    let ev = client
        .attach_and_wait(
            HOST,
            env.create_volume(HOST),
            env.appliance,
            true,
            common::WAIT,
        )
        .await
        .expect("attach event");
    assert!(ev.event_type.succeeded(), "{ev:?}");
    client.close().await;
}
