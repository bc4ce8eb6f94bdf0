use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use sqlx::PgPool;

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: i64,
    /// One JSON object: the dead letter, its body, error history and replays.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pool: &PgPool, a: &ShowArgs) -> Result<ExitCode> {
    let Some(r) = crate::dlq::get(pool, a.id).await? else {
        eprintln!("no dead letter {}", a.id);
        return Ok(ExitCode::from(1));
    };
    // Every attempt's error, not only the last one the dead letter names: a
    // request that timed out twice and then hit a capacity error reads
    // differently from one that failed the same way every time.
    let history = match r.request_id {
        Some(id) => crate::db::error_history(pool, id).await?,
        None => Vec::new(),
    };
    let replays = crate::dlq::replays(pool, r.id).await?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            let body = std::str::from_utf8(&r.body).ok();
            o.insert("body".into(), json!(body));
            o.insert("body_bytes".into(), json!(r.body.len()));
            o.insert("error_history".into(), json!(history));
            let replays: Vec<_> = replays
                .iter()
                .map(|(at, by, key)| json!({"replayed_at": at, "replayed_by": by, "routing_key": key}))
                .collect();
            o.insert("replays".into(), json!(replays));
        }
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("id:            {}", r.id);
    println!("host:          {}", r.host);
    println!("status:        {}", r.status);
    println!("message id:    {}", r.message_id.as_deref().unwrap_or("-"));
    println!(
        "request id:    {}",
        r.request_id
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "volume id:     {}",
        r.volume_id
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("reason:        {}", r.reason);
    println!("error code:    {}", r.error_code.as_deref().unwrap_or("-"));
    println!(
        "error:         {}",
        r.error_message.as_deref().unwrap_or("-")
    );
    println!(
        "original:      {} / {}",
        r.original_exchange, r.original_routing_key
    );
    println!(
        "deaths:        {} (first {}, last {})",
        r.death_count,
        r.first_seen.to_rfc3339(),
        r.last_seen.to_rfc3339()
    );
    println!("properties:    {}", r.properties);
    println!(
        "headers:       {}",
        serde_json::to_string_pretty(&r.headers)?
    );
    match std::str::from_utf8(&r.body) {
        Ok(text) => println!("body:          {text}"),
        Err(_) => println!("body:          {} bytes, not UTF-8", r.body.len()),
    }
    if history.is_empty() {
        println!("error history: none");
    } else {
        println!("error history: {} error(s), oldest first", history.len());
    }
    for e in &history {
        println!(
            "  {} generation {} attempt {}: {} ({}) {}",
            e.at.to_rfc3339(),
            e.generation,
            e.attempt,
            e.code,
            if e.retryable {
                "retryable"
            } else {
                "permanent"
            },
            e.message
        );
    }
    if replays.is_empty() {
        println!("replays:       none");
    }
    for (at, by, key) in replays {
        println!("replayed:      {} by {by} to {key}", at.to_rfc3339());
    }
    Ok(ExitCode::SUCCESS)
}
