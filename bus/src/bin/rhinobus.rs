//! `rhinobus`: operations on a running rhinobus system. See `rhinobus --help`.

use clap::{Args, Parser, Subcommand};
use rhinobus::ops::{Action, ErrorQueue, FailedMessage, Outcome, Selection, group};
use rhinobus::transport::{DEFAULT_AMQP_URL, RabbitMq};
use rhinobus::{Bus, SendOptions};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[derive(Debug, Parser)]
#[command(
    name = "rhinobus",
    version,
    about = "Operate a rhinobus system: inspect and replay failed messages, send messages"
)]
struct Cli {
    /// RabbitMQ address.
    #[arg(long, global = true, env = "RHINOBUS_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect, replay, archive and purge failed messages.
    Errors {
        /// The error queue.
        #[arg(long, global = true, default_value = "error")]
        queue: String,
        #[command(subcommand)]
        command: ErrorsCommand,
    },
    /// Send a message given as JSON, encoded as MessagePack with rhinobus envelope headers.
    Send {
        /// The queue to send to.
        queue: String,
        /// The message type's wire name, e.g. billing.call-made.
        #[arg(long = "type")]
        message_type: String,
        /// The body, as JSON.
        #[arg(long = "json")]
        body: String,
        /// Extra headers, as NAME=VALUE.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Deliver it no sooner than this from now, e.g. 30s, 15m, 2h.
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Handle it only within this of being due, e.g. 30s; later it is dropped unhandled.
        #[arg(long, value_parser = humantime::parse_duration)]
        time_to_be_received: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum ErrorsCommand {
    /// List failed messages, oldest first.
    List {
        /// Only this message type.
        #[arg(long = "type")]
        message_type: Option<String>,
        /// Only failures from this queue.
        #[arg(long)]
        source: Option<String>,
        /// Only failures in this recent time, e.g. 15m, 2h, 1day.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Failures grouped by error type, message type and source queue.
    Groups {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one failed message: headers, failure, body.
    Show {
        /// The message id (as `list` shows it).
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send failed messages back to their source queue (or --to).
    Replay {
        #[command(flatten)]
        select: Select,
        /// Send them to this queue instead.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        run: RunFlags,
    },
    /// Move failed messages to <queue>.archive: out of the working list, but kept.
    Archive {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        run: RunFlags,
    },
    /// Delete failed messages for good.
    Purge {
        #[command(flatten)]
        select: Select,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        run: RunFlags,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = true)]
struct Select {
    /// Message ids.
    ids: Vec<String>,
    /// A failure group id (from `groups`).
    #[arg(long)]
    group: Option<String>,
    /// A message type.
    #[arg(long = "type")]
    message_type: Option<String>,
    /// Every failed message.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct RunFlags {
    /// Only count what would be affected.
    #[arg(long)]
    dry_run: bool,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl From<Select> for Selection {
    fn from(s: Select) -> Self {
        Selection {
            ids: s.ids,
            group: s.group,
            message_type: s.message_type,
            all: s.all,
            ..Selection::default()
        }
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

type CliError = Box<dyn std::error::Error>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rhinobus: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Send {
            queue,
            message_type,
            body,
            headers,
            delay,
            time_to_be_received,
        } => {
            let json: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| format!("--json is not valid JSON: {e}"))?;
            let encoded = rmp_serde::to_vec_named(&json)?;
            let bus = Bus::new(RabbitMq::new(&cli.amqp), "rhinobus-cli");
            let options = SendOptions {
                headers: headers.into_iter().collect(),
                delay,
                time_to_be_received,
            };
            let id = bus
                .send_encoded(&queue, &message_type, encoded, options)
                .await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Errors { queue, command } => {
            let errors = ErrorQueue::connect(&cli.amqp, &queue).await?;
            errors_command(&errors, command).await
        }
    }
}

async fn errors_command(errors: &ErrorQueue, command: ErrorsCommand) -> Result<ExitCode, CliError> {
    match command {
        ErrorsCommand::List {
            message_type,
            source,
            since,
            limit,
            json,
        } => {
            let since = since
                .map(|d| {
                    SystemTime::now()
                        .checked_sub(d)
                        .ok_or("--since reaches back too far")
                })
                .transpose()?;
            let filter = Selection {
                message_type,
                source_queue: source,
                since,
                all: true,
                ..Selection::default()
            };
            let listed: Vec<_> = errors
                .browse()
                .await?
                .into_iter()
                .filter(|m| filter.matches(m))
                .take(limit.unwrap_or(usize::MAX))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                print_table(
                    &["ID", "TYPE", "SOURCE", "FAILED AT", "ATTEMPTS", "ERROR"],
                    listed.iter().map(|m| {
                        vec![
                            m.id.clone(),
                            or_dash(&m.message_type),
                            or_dash(&m.source_queue),
                            time_or_dash(m.failed_at),
                            m.attempts.map_or("-".into(), |a| a.to_string()),
                            m.error_summary().to_owned(),
                        ]
                    }),
                );
            }
        }
        ErrorsCommand::Groups { json } => {
            let groups = group(&errors.browse().await?);
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                print_table(
                    &[
                        "GROUP",
                        "COUNT",
                        "ERROR TYPE",
                        "TYPE",
                        "SOURCE",
                        "FIRST",
                        "LAST",
                        "ERROR",
                    ],
                    groups.iter().map(|g| {
                        vec![
                            g.id.clone(),
                            g.count.to_string(),
                            or_dash(&g.error_type),
                            or_dash(&g.message_type),
                            or_dash(&g.source_queue),
                            time_or_dash(g.first),
                            time_or_dash(g.last),
                            g.example_error.clone(),
                        ]
                    }),
                );
            }
        }
        ErrorsCommand::Show { id, json } => {
            let found = errors.find(&id).await?;
            if found.is_empty() {
                return Err(format!("no message {id:?} in error queue {:?}", errors.name()).into());
            }
            for m in &found {
                show(m, json)?;
            }
        }
        ErrorsCommand::Replay { select, to, run } => {
            let outcome = errors
                .apply(&select.into(), &Action::Replay { to }, run.dry_run)
                .await?;
            return report("replayed", &outcome, &run);
        }
        ErrorsCommand::Archive { select, run } => {
            let outcome = errors
                .apply(&select.into(), &Action::Archive, run.dry_run)
                .await?;
            return report("archived", &outcome, &run);
        }
        ErrorsCommand::Purge { select, yes, run } => {
            if !yes && !run.dry_run {
                return Err("purge deletes messages for good; add --yes to do it (or --dry-run to count them)".into());
            }
            let outcome = errors
                .apply(&select.into(), &Action::Purge, run.dry_run)
                .await?;
            return report("purged", &outcome, &run);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(m: &FailedMessage, json: bool) -> Result<(), CliError> {
    let body = m.body_json();
    if json {
        let mut value = serde_json::to_value(m)?;
        value["body"] = body.unwrap_or_else(|| serde_json::Value::String(hex(&m.body)));
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("message {}", m.id);
    println!("  type        {}", or_dash(&m.message_type));
    println!("  source      {}", or_dash(&m.source_queue));
    println!("  failed at   {}", time_or_dash(m.failed_at));
    println!("  failed      {} time(s)", m.failed_times);
    println!("  reason      {}", or_dash(&m.reason));
    println!("  error type  {}", or_dash(&m.error_type));
    println!("  error       {}", or_dash(&m.error_message));
    if let Some(chain) = m
        .headers
        .get(rhinobus::headers::names::FAILURE_ERROR_CHAIN)
        .filter(|c| !c.is_empty())
    {
        for cause in chain.lines() {
            println!("    caused by {cause}");
        }
    }
    println!("headers");
    for (k, v) in &m.headers {
        println!("  {k}: {v}");
    }
    match body {
        Some(json) => println!(
            "body (MessagePack as JSON)\n{}",
            serde_json::to_string_pretty(&json)?
        ),
        None => println!(
            "body ({} bytes, not MessagePack; hex)\n{}",
            m.body.len(),
            hex(&m.body)
        ),
    }
    Ok(())
}

fn report(verb: &str, outcome: &Outcome, run: &RunFlags) -> Result<ExitCode, CliError> {
    if run.json {
        println!("{}", serde_json::to_string_pretty(outcome)?);
    } else if run.dry_run {
        println!(
            "{} of {} messages would be {verb}",
            outcome.selected, outcome.examined
        );
    } else {
        println!(
            "{verb} {} of {} selected ({} examined)",
            outcome.moved, outcome.selected, outcome.examined
        );
    }
    for f in &outcome.failed {
        eprintln!(
            "rhinobus: {} not {verb}, left in the error queue: {}",
            f.id, f.error
        );
    }
    Ok(if outcome.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn or_dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn time_or_dash(t: Option<SystemTime>) -> String {
    t.map_or("-".into(), |t| {
        humantime::format_rfc3339_seconds(t).to_string()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  "));
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    let count = rows.len();
    rows.into_iter().for_each(line);
    if count == 0 {
        println!("(no messages)");
    }
}
