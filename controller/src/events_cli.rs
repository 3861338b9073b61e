//! `powernode-controller events …`: the fleet's events through the operator API
//! (`GET /api/v1/events`), as a table or one JSON object per line, optionally following new
//! ones.

use powernode_types::text::{columns, one_line, rfc3339_millis};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use powernode_types::Severity;

use crate::client::{query, Client, ClientArgs};
use crate::duration::parse_duration;
use crate::events;
use crate::wire::{EventsPage, StoredEvent};

/// How often `--follow` looks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// `events` arguments.
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this node's events.
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Only events at least this severe: info, warning, error, critical.
    #[arg(long, value_name = "S", value_parser = events::parse_severity)]
    severity: Option<Severity>,
    /// Only events of exactly this kind.
    #[arg(long, value_name = "K")]
    kind: Option<String>,
    /// Only events raised at or after T (node clock): ms since the epoch, an RFC 3339 time, or
    /// a duration ago (10m, 2h, 7d).
    #[arg(long, value_name = "T", value_parser = parse_since)]
    since: Option<i64>,
    /// Print the last N matching events (oldest first).
    #[arg(long, value_name = "N", default_value_t = events::DEFAULT_PAGE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(events::MAX_PAGE)))]
    limit: u32,
    /// Keep printing new events as they arrive (every second) until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// `--since`: [`events::parse_time`], or a duration before now.
fn parse_since(text: &str) -> Result<i64, String> {
    events::parse_time(text).or_else(|time_err| {
        let ago = parse_duration(text).map_err(|_| time_err)?;
        let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
        Ok(crate::now_ms().saturating_sub(ago))
    })
}

/// Runs `events`.
pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let client = args.client.client()?;
    print_events(&client, &args).await
}

/// One page of events matching `args`: the newest `limit` (oldest first) when `after` is
/// `None`, else up to `limit` after that cursor.
async fn page(
    client: &Client,
    args: &EventsArgs,
    after: Option<i64>,
    limit: u32,
) -> anyhow::Result<EventsPage> {
    let path = format!(
        "/api/v1/events{}",
        query(&[
            ("node", args.node.clone()),
            ("severity", args.severity.map(|s| format!("{s:?}"))),
            ("kind", args.kind.clone()),
            ("since", args.since.map(|ms| ms.to_string())),
            ("limit", Some(limit.to_string())),
            ("after", after.map(|c| c.to_string())),
            ("newest", after.is_none().then(|| "true".to_owned())),
        ])
    );
    Ok(client.get(&path).await?)
}

async fn print_events(client: &Client, args: &EventsArgs) -> anyhow::Result<()> {
    let tail = page(client, args, None, args.limit).await?;
    if !args.json {
        println!("{}", header());
    }
    print_batch(&tail.events, args.json)?;
    if !args.follow {
        return Ok(());
    }
    let mut after = tail.events.last().map_or(0, |e| e.cursor);
    loop {
        let batch = page(client, args, Some(after), events::MAX_PAGE).await?;
        print_batch(&batch.events, args.json)?;
        after = batch.next.max(after);
        if batch.events.len() < events::MAX_PAGE as usize {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            }
        }
    }
}

fn print_batch(batch: &[StoredEvent], json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for event in batch {
        if json {
            serde_json::to_writer(&mut out, event)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", event_line(event))?;
        }
    }
    out.flush().context("cannot write to stdout")
}

/// The header of the events table.
pub fn header() -> String {
    row([
        "TIME", "NODE", "SEVERITY", "KIND", "AGENT", "MESSAGE", "FIELDS",
    ])
}

/// One event as a row of the events table: time (node clock), node, severity, kind, agent,
/// message, fields as `key=value`. Control characters are escaped, so a row is one line.
pub fn event_line(e: &StoredEvent) -> String {
    let fields: Vec<String> = e
        .fields
        .iter()
        .map(|(k, v)| format!("{}={}", one_line(k), one_line(v)))
        .collect();
    let mut message = one_line(&e.message);
    if e.dropped_before > 0 {
        message = format!("({} dropped before) {message}", e.dropped_before);
    }
    row([
        &rfc3339_millis(e.at_ms),
        &e.node_id,
        &format!("{:?}", e.severity),
        &e.kind,
        &e.agent,
        &message,
        &fields.join(" "),
    ])
}

/// Fixed column widths (the widest usual value), so that rows printed apart still line up.
fn row(cells: [&str; 7]) -> String {
    columns(&cells, &[24, 21, 8, 28, 12, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_one_aligned_line() {
        let event = StoredEvent {
            cursor: 1,
            node_id: "node-0123456789abcdef".into(),
            id: "e-1".into(),
            agent: "modulemgr".into(),
            seq: 1,
            severity: Severity::Warning,
            kind: "module.start_failed".into(),
            message: "tools\nfailed".into(),
            at_ms: 1_700_000_000_123,
            received_ms: 1_700_000_000_500,
            fields: vec![("module".into(), "tools".into())],
            dropped_before: 2,
        };
        let line = event_line(&event);
        assert_eq!(
            line,
            "2023-11-14T22:13:20.123Z  node-0123456789abcdef  Warning   \
             module.start_failed           modulemgr     (2 dropped before) tools\\nfailed  \
             module=tools"
        );
        assert_eq!(header().find("NODE"), line.find("node-"));
        assert_eq!(header().find("MESSAGE"), line.find("(2 dropped"));
    }

    #[test]
    fn since_takes_times_and_durations_ago() {
        assert_eq!(parse_since("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_since("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        let ago = crate::now_ms() - parse_since("10m").unwrap();
        assert!((600_000..610_000).contains(&ago), "{ago}");
        assert!(parse_since("soon").is_err());
    }
}
