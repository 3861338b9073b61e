//! `powernode-controller script add|show` and `scripts`: NodeScripts through the operator API
//! (`/api/v1/scripts`, the rules of [`crate::service::scripts`]). A `node.exec` task names a
//! stored script by the digest `script add` prints: `--args '{"script_digest": "sha256:…"}'`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use powernode_types::text::{columns, rfc3339_millis};

use crate::client::{encode, ClientArgs, ClientError};
use crate::service::scripts::check_script;
use crate::wire::{AddScriptRequest, Script};

/// `script …` subcommands.
#[derive(Debug, Subcommand)]
pub enum ScriptCommand {
    /// Store a script (UTF-8 text); prints its digest (the stored script with --json).
    /// Storing the same text again changes nothing and prints the same.
    Add(AddArgs),
    /// Print a stored script's text (its digest, size, time and text with --json).
    Show(ShowArgs),
}

/// `script add` arguments.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The script file; `-` reads standard input.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    /// Print the stored script (digest, size, created_at_ms) as JSON instead of its digest.
    #[arg(long)]
    json: bool,
}

/// `script show` arguments.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The digest, `sha256:<64 hex>` (as `script add` or `scripts` prints it).
    digest: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `scripts` arguments.
#[derive(Debug, Args)]
pub struct ScriptsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs a `script` subcommand.
pub async fn run(command: ScriptCommand) -> anyhow::Result<()> {
    match command {
        ScriptCommand::Add(args) => add(args).await,
        ScriptCommand::Show(ShowArgs {
            digest,
            client,
            json,
        }) => {
            let script: Script = client
                .client()?
                .get(&format!("/api/v1/scripts/{}", encode(&digest)))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&script)?);
            } else {
                // The text exactly as stored: `script show D > f` gives back the file added.
                print!("{}", script.script.unwrap_or_default());
            }
            Ok(())
        }
    }
}

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let bytes = if args.file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading the script from standard input")?;
        bytes
    } else {
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {}): scripts are stored and sent as text",
            args.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    // The service's own limit, before a too large script is sent at all.
    check_script(&text).map_err(ClientError::from)?;
    let stored: Script = args
        .client
        .client()?
        .post("/api/v1/scripts", &AddScriptRequest { script: text })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stored)?);
    } else {
        println!("{}", stored.digest);
    }
    Ok(())
}

/// Runs `scripts`.
pub async fn list(args: ScriptsArgs) -> anyhow::Result<()> {
    let scripts: Vec<Script> = args.client.client()?.get("/api/v1/scripts").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&scripts)?);
    } else {
        println!("{}", row(["DIGEST", "SIZE", "CREATED"]));
        for script in &scripts {
            println!("{}", script_row(script));
        }
    }
    Ok(())
}

fn row(cells: [&str; 3]) -> String {
    columns(&cells, &[71, 8])
}

/// One script as a row of `scripts`.
fn script_row(s: &Script) -> String {
    row([
        &s.digest,
        &s.size.to_string(),
        &rfc3339_millis(s.created_at_ms),
    ])
}
