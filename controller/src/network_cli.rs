//! `powernode-controller network …` and `networks`: overlay networks, membership and port
//! forwards through the operator API (`/api/v1/networks`, `/api/v1/forwards`), whose rules
//! ([`crate::service::networks`], [`crate::networks`]) are the only ones; the nodes whose
//! desired network changed learn it at once.

use clap::{Args, Subcommand};
use powernode_types::text::{columns, one_line, rfc3339_millis};
use serde::Serialize;

use crate::client::{encode, query, ClientArgs};
use crate::networks::{EndpointSource, Forward};
use crate::wire::{
    AddForwardRequest, CreateNetworkRequest, DeleteNetworkResponse, ForwardResponse,
    JoinNetworkRequest, JoinResponse, LeaveNetworkRequest, LeaveResponse, MemberDetail, Network,
    NetworkDetail, NodeGeneration,
};

/// `network …` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create an empty network.
    Create(CreateArgs),
    /// Make a node a member: it gets the lowest free address of the network. Joining the
    /// same network again keeps the address and replaces --announce and --endpoint.
    Join(JoinArgs),
    /// Take a node out: its address is freed, its forwards removed, its network withdrawn.
    Leave(LeaveArgs),
    /// Show a network: members, addresses, keys, endpoints, what each node reports.
    Show(ShowArgs),
    /// Delete a network without members.
    Delete(DeleteArgs),
    /// Port forwards of members: add, remove, list.
    #[command(subcommand)]
    Forward(ForwardCommand),
}

/// `network create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Its name: 1 to 32 of a-z, 0-9 and -.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Its IPv4 CIDR, prefix 8 to 30, e.g. 10.88.0.0/16.
    #[arg(long, value_name = "CIDR")]
    cidr: String,
    /// The UDP port its members listen on.
    #[arg(long, value_name = "PORT", default_value_t = u32::from(crate::networks::DEFAULT_PORT))]
    port: u32,
    /// Print the network as JSON.
    #[arg(long)]
    json: bool,
}

/// `network join` arguments.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The network.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    #[arg(long, value_name = "ID")]
    node: String,
    /// A route (IPv4 CIDR) behind the node that the others send to it (repeat for several).
    #[arg(long, value_name = "CIDR")]
    announce: Vec<String>,
    /// HOST:PORT the other members dial it at, instead of what it reports.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Print the membership as JSON.
    #[arg(long)]
    json: bool,
}

/// `network leave` arguments.
#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The network.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    #[arg(long, value_name = "ID")]
    node: String,
}

/// `network show` arguments.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The network.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON (as `GET /api/v1/networks/{name}`).
    #[arg(long)]
    json: bool,
}

/// `network delete` arguments.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The network.
    name: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// `networks` arguments.
#[derive(Debug, Args)]
pub struct NetworksArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `network forward …` subcommands.
#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Forward a member's port: connections to it go to --to.
    Add(ForwardAddArgs),
    /// Remove a forward.
    Remove(ForwardRemoveArgs),
    /// List forwards, by node, protocol and port.
    List(ForwardListArgs),
}

/// `network forward add` arguments.
#[derive(Debug, Args)]
pub struct ForwardAddArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node (a member of a network).
    #[arg(long, value_name = "ID")]
    node: String,
    /// tcp or udp.
    #[arg(long, value_name = "PROTO")]
    proto: String,
    /// The node's port (not its network's listen port).
    #[arg(long, value_name = "PORT")]
    port: u32,
    /// Where connections go: an IPv4 address and port.
    #[arg(long, value_name = "ADDR:PORT")]
    to: String,
}

/// `network forward remove` arguments.
#[derive(Debug, Args)]
pub struct ForwardRemoveArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    #[arg(long, value_name = "ID")]
    node: String,
    /// tcp or udp.
    #[arg(long, value_name = "PROTO")]
    proto: String,
    /// The node's port.
    #[arg(long, value_name = "PORT")]
    port: u32,
}

/// `network forward list` arguments.
#[derive(Debug, Args)]
pub struct ForwardListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this node's forwards.
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `updated node-a (generation 4), node-b (generation 7)`, or nothing.
fn updated_text(updated: &[NodeGeneration]) -> String {
    if updated.is_empty() {
        return String::new();
    }
    let list: Vec<String> = updated
        .iter()
        .map(|u| format!("{} (generation {})", u.node_id, u.generation))
        .collect();
    format!("desired network updated: {}\n", list.join(", "))
}

/// Prints `value` as JSON with `--json`, else as `text` writes it.
fn print_json_or<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

/// The path of network `name`, and `rest` under it.
fn network_path(name: &str, rest: &str) -> String {
    format!("/api/v1/networks/{}{rest}", encode(name))
}

/// Runs a `network` subcommand.
pub async fn run(command: NetworkCommand) -> anyhow::Result<()> {
    match command {
        NetworkCommand::Create(args) => create(args).await,
        NetworkCommand::Join(args) => join(args).await,
        NetworkCommand::Leave(LeaveArgs { name, client, node }) => {
            let reply: LeaveResponse = client
                .client()?
                .post(
                    &network_path(&name, "/leave"),
                    &LeaveNetworkRequest { node },
                )
                .await?;
            let left = &reply.left;
            print!(
                "{} left {} ({} is free; {} forward(s) removed)\n{}",
                left.node_id,
                left.network,
                left.address,
                left.forwards_removed,
                updated_text(&reply.updated)
            );
            Ok(())
        }
        NetworkCommand::Show(ShowArgs { name, client, json }) => {
            let detail: NetworkDetail = client.client()?.get(&network_path(&name, "")).await?;
            print_json_or(json, &detail, network_text)
        }
        NetworkCommand::Delete(DeleteArgs { name, client }) => {
            let deleted: DeleteNetworkResponse =
                client.client()?.delete(&network_path(&name, "")).await?;
            println!("deleted {}", deleted.deleted);
            Ok(())
        }
        NetworkCommand::Forward(command) => forward(command).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let req = CreateNetworkRequest {
        name: args.name,
        cidr: args.cidr,
        port: Some(args.port),
    };
    let network: Network = args.client.client()?.post("/api/v1/networks", &req).await?;
    print_json_or(args.json, &network, |n| {
        format!("network {} {} port {}\n", n.name, n.cidr, n.listen_port)
    })
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let req = JoinNetworkRequest {
        node: args.node,
        announce: args.announce,
        endpoint: args.endpoint,
    };
    let reply: JoinResponse = args
        .client
        .client()?
        .post(&network_path(&args.name, "/join"), &req)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print!(
            "{} is in {} as {}\n{}",
            reply.member.node_id,
            reply.member.network,
            reply.member.address,
            updated_text(&reply.updated)
        );
    }
    Ok(())
}

/// A forward added or removed (`done`: what to say first), then the generations it bumped.
fn forward_text(done: &str, reply: &ForwardResponse) -> String {
    let f = &reply.forward;
    format!(
        "{done}{} {} {} -> {}\n{}",
        f.node_id,
        f.proto,
        f.port,
        f.to,
        updated_text(&reply.updated)
    )
}

async fn forward(command: ForwardCommand) -> anyhow::Result<()> {
    match command {
        ForwardCommand::Add(args) => {
            let req = AddForwardRequest {
                node: args.node,
                proto: args.proto,
                port: args.port,
                to: args.to,
            };
            let reply: ForwardResponse =
                args.client.client()?.post("/api/v1/forwards", &req).await?;
            print!("{}", forward_text("", &reply));
            Ok(())
        }
        ForwardCommand::Remove(args) => {
            let path = format!(
                "/api/v1/forwards/{}/{}/{}",
                encode(&args.node),
                encode(&args.proto),
                args.port
            );
            let reply: ForwardResponse = args.client.client()?.delete(&path).await?;
            print!("{}", forward_text("removed ", &reply));
            Ok(())
        }
        ForwardCommand::List(args) => {
            let path = format!("/api/v1/forwards{}", query(&[("node", args.node)]));
            let forwards: Vec<Forward> = args.client.client()?.get(&path).await?;
            print_json_or(args.json, &forwards, |f| forwards_table(f))
        }
    }
}

/// Runs `networks`.
pub async fn list(args: NetworksArgs) -> anyhow::Result<()> {
    let networks: Vec<Network> = args.client.client()?.get("/api/v1/networks").await?;
    print_json_or(args.json, &networks, |n| networks_table(n))
}

/// A table: a line of `headers`, then a line of `cells` for each of `items`.
fn table<T, const N: usize>(
    headers: [&str; N],
    widths: &[usize],
    items: &[T],
    cells: impl Fn(&T) -> [String; N],
) -> String {
    let mut out = columns(&headers, widths) + "\n";
    for item in items {
        out.push_str(&columns(&cells(item), widths));
        out.push('\n');
    }
    out
}

fn networks_table(networks: &[Network]) -> String {
    table(
        ["NAME", "CIDR", "PORT", "MEMBERS", "CREATED"],
        &[20, 18, 6, 8],
        networks,
        |n| {
            [
                n.name.clone(),
                n.cidr.clone(),
                n.listen_port.to_string(),
                n.member_count.to_string(),
                rfc3339_millis(n.created_at_ms),
            ]
        },
    )
}

fn forwards_table(forwards: &[Forward]) -> String {
    table(
        ["NODE", "PROTO", "PORT", "TO", "CREATED"],
        &[21, 5, 6, 21],
        forwards,
        |f| {
            [
                f.node_id.clone(),
                f.proto.clone(),
                f.port.to_string(),
                f.to.clone(),
                rfc3339_millis(f.created_at_ms),
            ]
        },
    )
}

/// `network show` as text: the network, then a block per member.
fn network_text(d: &NetworkDetail) -> String {
    let n = &d.network;
    let mut out = format!(
        "network:  {}\ncidr:     {}\nport:     {}\ncreated:  {}\nmembers:  {}\n",
        n.name,
        n.cidr,
        n.listen_port,
        rfc3339_millis(n.created_at_ms),
        n.member_count
    );
    for m in &d.members {
        out.push_str(&member_text(m));
    }
    out
}

fn member_text(m: &MemberDetail) -> String {
    let mut out = format!(
        "\n  {}  {}  {}{}\n",
        m.member.node_id,
        m.member.address,
        one_line(&m.hostname),
        if m.revoked {
            "  (revoked: no one's peer)"
        } else {
            ""
        }
    );
    let line = |out: &mut String, label: &str, value: String| {
        out.push_str(&format!("    {label:<10} {value}\n"));
    };
    line(
        &mut out,
        "key",
        m.public_key
            .clone()
            .unwrap_or_else(|| "- (not reported yet: no one's peer)".to_owned()),
    );
    let source = |s: &EndpointSource| match s {
        EndpointSource::Operator => "set by the operator",
        EndpointSource::Reported => "reported by the node",
        EndpointSource::Heartbeat => "its heartbeats' address",
    };
    line(
        &mut out,
        "endpoint",
        match (&m.endpoint_used, &m.endpoint_source) {
            (Some(e), Some(s)) => format!("{} ({})", one_line(e), source(s)),
            _ => "- (peers wait for it to dial them)".to_owned(),
        },
    );
    if !m.member.announce.is_empty() {
        line(&mut out, "announces", m.member.announce.join(", "));
    }
    let heartbeat = m.last_heartbeat_ms.map_or_else(
        || "no heartbeat yet".to_owned(),
        |at| format!("heartbeat {}", rfc3339_millis(at)),
    );
    match &m.reported {
        None => line(&mut out, "reported", format!("nothing ({heartbeat})")),
        Some(r) => {
            let mut said = vec![r.state.clone().unwrap_or_else(|| "?".to_owned())];
            if let Some(up) = r.peers_up {
                said.push(format!("{up} peer(s) up"));
            }
            if r.userspace == Some(true) {
                said.push("userspace".to_owned());
            }
            if let Some(g) = r.generation {
                said.push(format!("applied generation {g} of {}", m.generation));
            }
            if let Some(e) = &r.error {
                said.push(format!("error: {}", one_line(e)));
            }
            said.push(heartbeat);
            line(&mut out, "reported", said.join(", "));
            for p in &r.peers {
                let who = p
                    .node_id
                    .clone()
                    .unwrap_or_else(|| format!("key {}", one_line(&p.public_key)));
                let handshake = p
                    .last_handshake_ms
                    .and_then(|ms| i64::try_from(ms).ok())
                    .map_or_else(
                        || "no handshake".to_owned(),
                        |ms| format!("handshake {}", rfc3339_millis(ms)),
                    );
                line(
                    &mut out,
                    "peer",
                    format!(
                        "{who}  {}  {handshake}  rx {} B  tx {} B",
                        p.endpoint
                            .as_deref()
                            .map_or_else(|| "-".to_owned(), one_line),
                        p.rx_bytes,
                        p.tx_bytes
                    ),
                );
            }
        }
    }
    for f in &m.forwards {
        line(
            &mut out,
            "forward",
            format!("{} {} -> {}", f.proto, f.port, f.to),
        );
    }
    out
}
