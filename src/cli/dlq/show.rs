use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use sqlx::PgPool;

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: i64,
}

pub async fn run(pool: &PgPool, a: &ShowArgs) -> Result<ExitCode> {
    let Some(r) = crate::dlq::get(pool, a.id).await? else {
        eprintln!("no dead letter {}", a.id);
        return Ok(ExitCode::from(1));
    };
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
    let replays = crate::dlq::replays(pool, r.id).await?;
    if replays.is_empty() {
        println!("replays:       none");
    }
    for (at, by, key) in replays {
        println!("replayed:      {} by {by} to {key}", at.to_rfc3339());
    }
    Ok(ExitCode::SUCCESS)
}
