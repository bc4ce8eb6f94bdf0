//! How a migration service drives volumed with the client library: attach a
//! set of target volumes to the appliance VM with NBD exports, report where
//! each one is served, and on `--detach` take them away again.
//!
//! ```console
//! $ export VOLUMED_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
//! $ cargo run --example migration_service -- oma-1 <appliance-vm-id> <volume-id>...
//! $ cargo run --example migration_service -- --detach oma-1 <appliance-vm-id> <volume-id>...
//! ```
//!
//! All requests are published at once and the outcomes awaited together:
//! volumed runs different volumes in parallel, so a wave costs about as
//! long as its slowest volume. Each request carries a `traceparent`, so the
//! service's trace continues through volumed into the completion events.

use std::process::ExitCode;
use std::time::Duration;

use uuid::Uuid;
use volumed::client::{Client, ClientError, Outgoing};
use volumed::config::SecretUrl;
use volumed::trace::TraceParent;

/// How long one volume may take. A cloud attach is usually seconds; a
/// timeout means "unknown", not "failed" (see below).
const PER_VOLUME: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let detach = args.first().is_some_and(|a| a == "--detach");
    if detach {
        args.remove(0);
    }
    let (host, vm, volumes) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}\nusage: migration_service [--detach] <host> <appliance-vm> <volume>...");
            return ExitCode::from(2);
        }
    };
    let url = SecretUrl::new(
        std::env::var("VOLUMED_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    );
    let client = match Client::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot reach the broker: {e}");
            return ExitCode::from(2);
        }
    };

    // One trace for the whole wave; every request is a span of it.
    let wave = TraceParent::new_root();
    println!("wave trace id {}", wave.trace_id_hex());
    let requests = volumes.iter().map(|v| {
        let req = if detach {
            Outgoing::detach(&host, *v, Some(vm))
        } else {
            Outgoing::attach(&host, *v, vm, true)
        };
        req.with_trace(&wave.child())
    });
    let results =
        futures_util::future::join_all(requests.map(|r| client.request_and_wait(r, PER_VOLUME)))
            .await;

    let mut failed = 0;
    for (volume, result) in volumes.iter().zip(results) {
        match result {
            Ok(event) if event.event_type.succeeded() => match &event.export {
                Some(x) => println!(
                    "{volume}: served as nbd://<appliance>:{}/{}",
                    x.port, x.name
                ),
                None => println!("{volume}: {}", event.event_type.as_str()),
            },
            Ok(event) => {
                failed += 1;
                let why = event
                    .error
                    .map(|e| {
                        format!(
                            "{} ({}retryable): {}",
                            e.code,
                            if e.retryable { "" } else { "not " },
                            e.message
                        )
                    })
                    .unwrap_or_default();
                println!("{volume}: {} {why}", event.event_type.as_str());
            }
            // The outcome is unknown: the request may still run. Publishing
            // the same request id again later is safe; a new id is a new
            // request.
            Err(ClientError::Timeout { request_id, .. }) => {
                failed += 1;
                println!("{volume}: no answer yet for request {request_id}");
            }
            Err(e) => {
                failed += 1;
                println!("{volume}: {e}");
            }
        }
    }
    client.close().await;
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn parse(args: &[String]) -> Result<(String, Uuid, Vec<Uuid>), String> {
    let [host, vm, volumes @ ..] = args else {
        return Err("missing arguments".into());
    };
    if volumes.is_empty() {
        return Err("name at least one volume".into());
    }
    let id = |s: &String| Uuid::parse_str(s).map_err(|_| format!("{s:?} is not a UUID"));
    Ok((
        host.clone(),
        id(vm)?,
        volumes.iter().map(id).collect::<Result<_, _>>()?,
    ))
}
