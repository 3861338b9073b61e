//! Overlay networks: networks, their members and overlay addresses, port forwards, and what
//! nodes report that peers are derived from (tables of migration 0007). Every change that can
//! change a member's desired network — a join, a leave, a forward, a revocation, a heartbeat
//! with a new key or endpoint — re-derives the whole network in the same transaction
//! ([`sync`]) and bumps the generation of exactly the members whose derived network changed.
//! The rules themselves are in [`crate::networks`].
//!
//! Each change of a network writes its `networks` row first: in SQLite that takes the write
//! lock before anything is read (a transaction that reads first and writes later may find
//! another writer committed in between), elsewhere it locks the network's row.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;
use sqlx::{AnyConnection, FromRow};

use super::{query_err, Storage, StorageError};
use crate::networks::{
    self, derive, endpoint_of, Cidr, EndpointSource, Forward, MemberFacts, NetworkFacts,
    NodeReport, Refusal, ReportedNetwork,
};

/// A network as listed.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Network {
    /// Its name.
    pub name: String,
    /// Its IPv4 CIDR.
    pub cidr: String,
    /// The UDP port its members listen on.
    pub listen_port: u16,
    /// When it was created, ms.
    pub created_at_ms: i64,
    /// Its members now.
    pub member_count: u64,
}

/// A node's membership.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Member {
    /// The network.
    pub network: String,
    /// The node.
    pub node_id: String,
    /// Its overlay address, `a.b.c.d`.
    pub address: String,
    /// Routes it announces.
    pub announce: Vec<String>,
    /// The operator's endpoint for it.
    pub endpoint: Option<String>,
    /// When it joined, ms.
    pub joined_at_ms: i64,
}

/// A member as `network show` has it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct MemberDetail {
    /// The membership.
    #[serde(flatten)]
    pub member: Member,
    /// The node's host name.
    pub hostname: String,
    /// The node is revoked (and no one's peer).
    pub revoked: bool,
    /// The public key it reported.
    pub public_key: Option<String>,
    /// The endpoint the other members are given for it.
    pub endpoint_used: Option<String>,
    /// Where that endpoint came from.
    pub endpoint_source: Option<EndpointSource>,
    /// The endpoints it reported.
    pub reported_endpoints: Vec<String>,
    /// The address its last heartbeat came from.
    pub seen_ip: Option<String>,
    /// Its desired-state generation.
    pub generation: u64,
    /// When its last heartbeat came, ms.
    pub last_heartbeat_ms: Option<i64>,
    /// Its network as its last heartbeat reported it (peers named by node where known).
    pub reported: Option<ReportedNetwork>,
    /// Its port forwards.
    pub forwards: Vec<Forward>,
}

/// Everything `network show` prints.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct NetworkDetail {
    /// The network.
    #[serde(flatten)]
    pub network: Network,
    /// Its members, by address.
    pub members: Vec<MemberDetail>,
}

/// What a leave did.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Left {
    /// The network left.
    pub network: String,
    /// The node.
    pub node_id: String,
    /// The address it had, free again.
    pub address: String,
    /// Its port forwards, removed with it.
    pub forwards_removed: u64,
}

#[derive(FromRow)]
struct NetworkRow {
    name: String,
    cidr: String,
    listen_port: i64,
    created_at_ms: i64,
    members: i64,
}

impl NetworkRow {
    fn into_network(self) -> Network {
        Network {
            name: self.name,
            cidr: self.cidr,
            listen_port: u16::try_from(self.listen_port).unwrap_or(0),
            created_at_ms: self.created_at_ms,
            member_count: u64::try_from(self.members).unwrap_or(0),
        }
    }

    fn facts(&self) -> Result<NetworkFacts, StorageError> {
        Ok(NetworkFacts {
            name: self.name.clone(),
            cidr: Cidr::parse(&self.cidr).map_err(|e| corrupt("network cidr", &self.name, e))?,
            listen_port: u16::try_from(self.listen_port).unwrap_or(0),
        })
    }
}

const NETWORK_COLUMNS: &str = "SELECT n.name, n.cidr, n.listen_port, n.created_at_ms,
       (SELECT COUNT(*) FROM network_members m WHERE m.network = n.name) AS members
     FROM networks n";

#[derive(FromRow)]
struct MemberRow {
    network: String,
    node_id: String,
    address: String,
    announce: String,
    endpoint: Option<String>,
    joined_at_ms: i64,
    hostname: String,
    revoked_at_ms: Option<i64>,
    public_key: Option<String>,
    endpoints: Option<String>,
    seen_ip: Option<String>,
    generation: Option<i64>,
    desired: Option<String>,
}

const MEMBER_COLUMNS: &str = "SELECT m.network, m.node_id, m.address, m.announce, m.endpoint,
       m.joined_at_ms, n.hostname, n.revoked_at_ms, r.public_key, r.endpoints, r.seen_ip,
       d.generation, d.network AS desired
     FROM network_members m
     JOIN nodes n ON n.id = m.node_id
     LEFT JOIN node_network_reports r ON r.node_id = m.node_id
     LEFT JOIN desired_state d ON d.node_id = m.node_id";

impl MemberRow {
    fn member(&self) -> Result<Member, StorageError> {
        Ok(Member {
            network: self.network.clone(),
            node_id: self.node_id.clone(),
            address: self.address.clone(),
            announce: serde_json::from_str(&self.announce)
                .map_err(|e| decode("announced routes", &self.node_id, e))?,
            endpoint: self.endpoint.clone(),
            joined_at_ms: self.joined_at_ms,
        })
    }

    fn report(&self) -> Result<NodeReport, StorageError> {
        Ok(NodeReport {
            public_key: self.public_key.clone(),
            endpoints: match &self.endpoints {
                Some(json) => serde_json::from_str(json)
                    .map_err(|e| decode("reported endpoints", &self.node_id, e))?,
                None => Vec::new(),
            },
            seen_ip: self.seen_ip.as_deref().and_then(|ip| ip.parse().ok()),
        })
    }

    fn facts(&self) -> Result<MemberFacts, StorageError> {
        let member = self.member()?;
        Ok(MemberFacts {
            address: member
                .address
                .parse()
                .map_err(|_| corrupt("member address", &self.node_id, &member.address))?,
            node_id: member.node_id,
            announce: member.announce,
            endpoint: member.endpoint,
            revoked: self.revoked_at_ms.is_some(),
            report: self.report()?,
        })
    }
}

#[derive(FromRow)]
struct ForwardRow {
    node_id: String,
    proto: String,
    port: i64,
    target: String,
    created_at_ms: i64,
}

impl From<ForwardRow> for Forward {
    fn from(row: ForwardRow) -> Self {
        Forward {
            node_id: row.node_id,
            proto: row.proto,
            port: u16::try_from(row.port).unwrap_or(0),
            to: row.target,
            created_at_ms: row.created_at_ms,
        }
    }
}

/// A `node_network_reports` row as the report it stores.
pub(super) fn stored_report(
    node_id: &str,
    public_key: Option<String>,
    endpoints: &str,
    seen_ip: Option<String>,
) -> Result<NodeReport, StorageError> {
    Ok(NodeReport {
        public_key,
        endpoints: serde_json::from_str(endpoints)
            .map_err(|e| decode("reported endpoints", node_id, e))?,
        seen_ip: seen_ip.and_then(|ip| ip.parse::<IpAddr>().ok()),
    })
}

fn decode(what: &'static str, node_id: &str, source: serde_json::Error) -> StorageError {
    StorageError::Decode {
        what,
        node_id: node_id.to_owned(),
        source,
    }
}

fn corrupt(what: &'static str, key: &str, detail: impl std::fmt::Display) -> StorageError {
    decode(what, key, serde::de::Error::custom(detail.to_string()))
}

fn to_json(
    what: &'static str,
    node_id: &str,
    value: &impl Serialize,
) -> Result<String, StorageError> {
    serde_json::to_string(value).map_err(|e| decode(what, node_id, e))
}

/// Nodes whose desired network a change re-derived, with their new generations.
pub type Bumped = Vec<(String, u64)>;

/// Re-derives every member's desired network of `network` and stores those that changed,
/// bumping their generations. A stored network is compared as the JSON text this controller
/// writes (`serde_json::to_string` of `DesiredNetwork`, as every writer of the column
/// does), so an unchanged derivation writes nothing.
async fn sync(
    conn: &mut AnyConnection,
    network: &str,
    now_ms: i64,
) -> Result<Bumped, StorageError> {
    let Some(row) = network_row(&mut *conn, network).await? else {
        return Ok(Vec::new());
    };
    let facts = row.facts()?;
    let rows = member_rows(&mut *conn, network, "list members for derivation").await?;
    let members = rows
        .iter()
        .map(MemberRow::facts)
        .collect::<Result<Vec<_>, _>>()?;
    let forwards = network_forwards(&mut *conn, network).await?;
    let stored: HashMap<&str, Option<&str>> = rows
        .iter()
        .map(|r| (r.node_id.as_str(), r.desired.as_deref()))
        .collect();
    let mut bumped = Vec::new();
    for (node_id, desired) in derive(&facts, &members, &forwards) {
        let json = desired
            .as_ref()
            .map(|d| to_json("network", &node_id, d))
            .transpose()?;
        if stored.get(node_id.as_str()).copied().flatten() == json.as_deref() {
            continue;
        }
        if let Some(generation) = set_network(&mut *conn, &node_id, json, now_ms).await? {
            bumped.push((node_id, generation));
        }
    }
    Ok(bumped)
}

/// Replaces a node's desired network and bumps its generation (`None`: no desired-state row).
async fn set_network(
    conn: &mut AnyConnection,
    node_id: &str,
    json: Option<String>,
    now_ms: i64,
) -> Result<Option<u64>, StorageError> {
    let generation: Option<i64> = sqlx::query_scalar(
        "UPDATE desired_state SET network = $1, generation = generation + 1, updated_at_ms = $2
         WHERE node_id = $3 RETURNING generation",
    )
    .bind(json)
    .bind(now_ms)
    .bind(node_id)
    .fetch_optional(conn)
    .await
    .map_err(query_err("store derived network"))?;
    Ok(generation.map(|g| u64::try_from(g).unwrap_or(0)))
}

async fn network_row(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Option<NetworkRow>, StorageError> {
    sqlx::query_as(&format!("{NETWORK_COLUMNS} WHERE n.name = $1"))
        .bind(name)
        .fetch_optional(conn)
        .await
        .map_err(query_err("get network"))
}

/// The members of `network` (`what`: the query, for its error).
async fn member_rows(
    conn: &mut AnyConnection,
    network: &str,
    what: &'static str,
) -> Result<Vec<MemberRow>, StorageError> {
    sqlx::query_as(&format!("{MEMBER_COLUMNS} WHERE m.network = $1"))
        .bind(network)
        .fetch_all(conn)
        .await
        .map_err(query_err(what))
}

async fn network_forwards(
    conn: &mut AnyConnection,
    network: &str,
) -> Result<Vec<Forward>, StorageError> {
    let rows: Vec<ForwardRow> = sqlx::query_as(
        "SELECT f.node_id, f.proto, f.port, f.target, f.created_at_ms
         FROM port_forwards f JOIN network_members m ON m.node_id = f.node_id
         WHERE m.network = $1 ORDER BY f.node_id, f.proto, f.port",
    )
    .bind(network)
    .fetch_all(conn)
    .await
    .map_err(query_err("list network forwards"))?;
    Ok(rows.into_iter().map(Forward::from).collect())
}

/// Marks `network` changed now: the first write of every change of it (see the module doc).
/// False when there is no such network.
async fn touch(conn: &mut AnyConnection, network: &str, now_ms: i64) -> Result<bool, StorageError> {
    let done = sqlx::query("UPDATE networks SET updated_at_ms = $1 WHERE name = $2")
        .bind(now_ms)
        .bind(network)
        .execute(conn)
        .await
        .map_err(query_err("touch network"))?;
    Ok(done.rows_affected() == 1)
}

/// Marks the network `node_id` is a member of changed now, as [`touch`] does. False when it
/// is in none.
async fn touch_network_of(
    conn: &mut AnyConnection,
    node_id: &str,
    now_ms: i64,
) -> Result<bool, StorageError> {
    let touched = sqlx::query(
        "UPDATE networks SET updated_at_ms = $1
         WHERE name = (SELECT network FROM network_members WHERE node_id = $2)",
    )
    .bind(now_ms)
    .bind(node_id)
    .execute(conn)
    .await
    .map_err(query_err("touch network"))?
    .rows_affected();
    Ok(touched == 1)
}

/// Re-derives the network `node_id` is a member of, if any, after a change of it written
/// already (so the write lock is held before [`network_of`] reads).
async fn sync_network_of(
    conn: &mut AnyConnection,
    node_id: &str,
    now_ms: i64,
) -> Result<Bumped, StorageError> {
    let Some(network) = network_of(&mut *conn, node_id).await? else {
        return Ok(Vec::new());
    };
    touch(&mut *conn, &network, now_ms).await?;
    sync(conn, &network, now_ms).await
}

/// The network `node_id` is a member of.
async fn network_of(
    conn: &mut AnyConnection,
    node_id: &str,
) -> Result<Option<String>, StorageError> {
    sqlx::query_scalar("SELECT network FROM network_members WHERE node_id = $1")
        .bind(node_id)
        .fetch_optional(conn)
        .await
        .map_err(query_err("get membership"))
}

/// `refusal`, or [`Refusal::NoNode`] when there is no node `node_id`.
async fn refusal_unless_no_node(
    conn: &mut AnyConnection,
    node_id: &str,
    refusal: Refusal,
) -> Result<Refusal, StorageError> {
    Ok(match node_state(conn, node_id).await? {
        None => Refusal::NoNode(node_id.to_owned()),
        Some(_) => refusal,
    })
}

/// Whether the node exists, and whether it is revoked.
async fn node_state(conn: &mut AnyConnection, node_id: &str) -> Result<Option<bool>, StorageError> {
    let row: Option<Option<i64>> =
        sqlx::query_scalar("SELECT revoked_at_ms FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(conn)
            .await
            .map_err(query_err("get node"))?;
    Ok(row.map(|revoked| revoked.is_some()))
}

/// A storage answer that may be a refusal.
pub type Outcome<T> = Result<Result<T, Refusal>, StorageError>;

impl Storage {
    /// Creates a network (name, CIDR and port checked by the caller).
    pub async fn create_network(
        &self,
        name: &str,
        cidr: Cidr,
        listen_port: u16,
        now_ms: i64,
    ) -> Outcome<Network> {
        let inserted = sqlx::query(
            "INSERT INTO networks (name, cidr, listen_port, created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(cidr.to_string())
        .bind(i64::from(listen_port))
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err("create network"))?
        .rows_affected();
        if inserted == 0 {
            return Ok(Err(Refusal::Exists(name.to_owned())));
        }
        self.durable("sync new network").await?;
        Ok(Ok(Network {
            name: name.to_owned(),
            cidr: cidr.to_string(),
            listen_port,
            created_at_ms: now_ms,
            member_count: 0,
        }))
    }

    /// Every network, by name.
    pub async fn networks(&self) -> Result<Vec<Network>, StorageError> {
        let rows: Vec<NetworkRow> = sqlx::query_as(&format!("{NETWORK_COLUMNS} ORDER BY n.name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list networks"))?;
        Ok(rows.into_iter().map(NetworkRow::into_network).collect())
    }

    /// Deletes a network that has no members.
    pub async fn delete_network(&self, name: &str) -> Outcome<()> {
        let deleted = sqlx::query(
            "DELETE FROM networks WHERE name = $1
               AND NOT EXISTS (SELECT 1 FROM network_members WHERE network = $1)",
        )
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(query_err("delete network"))?
        .rows_affected();
        if deleted == 1 {
            self.durable("sync network delete").await?;
            return Ok(Ok(()));
        }
        let mut conn = self.pool.acquire().await.map_err(query_err("acquire"))?;
        Ok(Err(match network_row(&mut conn, name).await? {
            None => Refusal::NoNetwork(name.to_owned()),
            Some(row) => Refusal::NotEmpty {
                name: name.to_owned(),
                members: u64::try_from(row.members).unwrap_or(0),
            },
        }))
    }

    /// Makes `node_id` a member of `network` with the lowest free host address, announcing
    /// `announce` (checked here, against the network and the other members' routes) and
    /// dialled at `endpoint` (checked by the caller) if given; the members' desired networks
    /// are re-derived. A node already in `network` keeps its address and gets the new
    /// `announce` and `endpoint`. Answers the membership and the generations bumped.
    pub async fn join_network(
        &self,
        network: &str,
        node_id: &str,
        announce: &[String],
        endpoint: Option<&str>,
        now_ms: i64,
    ) -> Outcome<(Member, Bumped)> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin join"))?;
        if !touch(&mut tx, network, now_ms).await? {
            return Ok(Err(Refusal::NoNetwork(network.to_owned())));
        }
        match node_state(&mut tx, node_id).await? {
            None => return Ok(Err(Refusal::NoNode(node_id.to_owned()))),
            Some(true) => return Ok(Err(Refusal::Revoked(node_id.to_owned()))),
            Some(false) => {}
        }
        let current = network_of(&mut tx, node_id).await?;
        if let Some(other) = current.as_deref().filter(|n| *n != network) {
            return Ok(Err(Refusal::InAnotherNetwork {
                node: node_id.to_owned(),
                network: other.to_owned(),
            }));
        }
        let row = network_row(&mut tx, network)
            .await?
            .ok_or_else(|| corrupt("network", network, "vanished within its transaction"))?;
        let facts = row.facts()?;
        let routes = match networks::check_announce(announce, facts.cidr) {
            Ok(routes) => routes,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let others: Vec<MemberRow> = sqlx::query_as(&format!(
            "{MEMBER_COLUMNS} WHERE m.network = $1 AND m.node_id <> $2"
        ))
        .bind(network)
        .bind(node_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_err("list members"))?;
        for other in &others {
            for theirs in other.member()?.announce {
                let Ok(theirs_cidr) = Cidr::parse(&theirs) else {
                    continue;
                };
                if let Some(mine) = routes.iter().find(|r| r.overlaps(theirs_cidr)) {
                    return Ok(Err(Refusal::RouteConflict(format!(
                        "announced route {mine} overlaps {theirs}, which {} announces",
                        other.node_id
                    ))));
                }
            }
        }
        let announce: Vec<String> = routes.iter().map(Cidr::to_string).collect();
        let announce_json = to_json("announced routes", node_id, &announce)?;
        if current.is_some() {
            sqlx::query(
                "UPDATE network_members SET announce = $1, endpoint = $2 WHERE node_id = $3",
            )
            .bind(&announce_json)
            .bind(endpoint)
            .bind(node_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("update member"))?;
        } else {
            let used = others
                .iter()
                .filter_map(|o| o.address.parse::<Ipv4Addr>().ok());
            let Some(address) = networks::allocate(facts.cidr, used) else {
                return Ok(Err(Refusal::Full {
                    name: network.to_owned(),
                    cidr: facts.cidr.to_string(),
                    hosts: facts.cidr.hosts(),
                }));
            };
            sqlx::query(
                "INSERT INTO network_members
                   (node_id, network, address, announce, endpoint, joined_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(node_id)
            .bind(network)
            .bind(address.to_string())
            .bind(&announce_json)
            .bind(endpoint)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(query_err("insert member"))?;
        }
        let bumped = sync(&mut tx, network, now_ms).await?;
        let member: MemberRow = sqlx::query_as(&format!("{MEMBER_COLUMNS} WHERE m.node_id = $1"))
            .bind(node_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(query_err("read member"))?;
        let member = member.member()?;
        tx.commit().await.map_err(query_err("commit join"))?;
        self.durable("sync join").await?;
        Ok(Ok((member, bumped)))
    }

    /// Takes `node_id` out of `network`: its forwards go, its address is free, its desired
    /// network becomes `null`, and the other members lose it as a peer.
    pub async fn leave_network(
        &self,
        network: &str,
        node_id: &str,
        now_ms: i64,
    ) -> Outcome<(Left, Bumped)> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin leave"))?;
        if !touch(&mut tx, network, now_ms).await? {
            return Ok(Err(Refusal::NoNetwork(network.to_owned())));
        }
        if network_of(&mut tx, node_id).await?.as_deref() != Some(network) {
            let not_member = Refusal::NotMember {
                node: node_id.to_owned(),
                network: format!("network {network}"),
            };
            return Ok(Err(
                refusal_unless_no_node(&mut tx, node_id, not_member).await?
            ));
        }
        let forwards_removed = sqlx::query("DELETE FROM port_forwards WHERE node_id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("delete member forwards"))?
            .rows_affected();
        let address: String =
            sqlx::query_scalar("DELETE FROM network_members WHERE node_id = $1 RETURNING address")
                .bind(node_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(query_err("delete member"))?;
        let mut bumped = Vec::new();
        let had_network: Option<Option<String>> =
            sqlx::query_scalar("SELECT network FROM desired_state WHERE node_id = $1")
                .bind(node_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(query_err("read desired network"))?;
        if had_network.flatten().is_some() {
            if let Some(generation) = set_network(&mut tx, node_id, None, now_ms).await? {
                bumped.push((node_id.to_owned(), generation));
            }
        }
        bumped.extend(sync(&mut tx, network, now_ms).await?);
        tx.commit().await.map_err(query_err("commit leave"))?;
        self.durable("sync leave").await?;
        Ok(Ok((
            Left {
                network: network.to_owned(),
                node_id: node_id.to_owned(),
                address,
                forwards_removed,
            },
            bumped,
        )))
    }

    /// A network with its members, what they reported, and their forwards.
    pub async fn network_detail(&self, name: &str) -> Result<Option<NetworkDetail>, StorageError> {
        let mut conn = self.pool.acquire().await.map_err(query_err("acquire"))?;
        let Some(row) = network_row(&mut conn, name).await? else {
            return Ok(None);
        };
        let facts = row.facts()?;
        let rows = member_rows(&mut conn, name, "list members").await?;
        let forwards = network_forwards(&mut conn, name).await?;
        let latest: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT h.node_id, h.received_at_ms, h.body FROM heartbeats h
             WHERE h.id IN (SELECT MAX(id) FROM heartbeats
                            WHERE node_id IN (SELECT node_id FROM network_members
                                              WHERE network = $1)
                            GROUP BY node_id)",
        )
        .bind(name)
        .fetch_all(&mut *conn)
        .await
        .map_err(query_err("latest member heartbeats"))?;
        drop(conn);
        let mut heartbeats: HashMap<String, (i64, Option<ReportedNetwork>)> = HashMap::new();
        for (node_id, at, body) in latest {
            let body: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| decode("heartbeat", &node_id, e))?;
            heartbeats.insert(
                node_id,
                (at, ReportedNetwork::from_heartbeat(body.get("network"))),
            );
        }
        let by_key: HashMap<String, String> = rows
            .iter()
            .filter_map(|r| Some((r.public_key.clone()?, r.node_id.clone())))
            .collect();
        let mut members = Vec::with_capacity(rows.len());
        for row in &rows {
            let facts_of = row.facts()?;
            let (last_heartbeat_ms, mut reported) = heartbeats
                .remove(&row.node_id)
                .map_or((None, None), |(at, r)| (Some(at), r));
            if let Some(r) = reported.as_mut() {
                for peer in &mut r.peers {
                    peer.node_id = by_key.get(&peer.public_key).cloned();
                }
            }
            let used = endpoint_of(&facts_of, facts.listen_port);
            members.push(MemberDetail {
                member: row.member()?,
                hostname: row.hostname.clone(),
                revoked: facts_of.revoked,
                public_key: facts_of.report.public_key.clone(),
                endpoint_used: used.as_ref().map(|(e, _)| e.clone()),
                endpoint_source: used.map(|(_, s)| s),
                reported_endpoints: facts_of.report.endpoints.clone(),
                seen_ip: facts_of.report.seen_ip.map(|ip| ip.to_string()),
                generation: row
                    .generation
                    .and_then(|g| u64::try_from(g).ok())
                    .unwrap_or(0),
                last_heartbeat_ms,
                reported,
                forwards: forwards
                    .iter()
                    .filter(|f| f.node_id == row.node_id)
                    .cloned()
                    .collect(),
            });
        }
        members.sort_by_key(|m| {
            (
                m.member.address.parse::<Ipv4Addr>().ok(),
                m.member.node_id.clone(),
            )
        });
        Ok(Some(NetworkDetail {
            network: row.into_network(),
            members,
        }))
    }

    /// Forwards `port`/`proto` of member `node_id` to `to` (proto, port and target checked by
    /// the caller). The same forward again changes nothing; one of the same port elsewhere
    /// is refused. Answers the forward and the generations bumped.
    pub async fn add_forward(
        &self,
        node_id: &str,
        proto: &str,
        port: u16,
        to: &str,
        now_ms: i64,
    ) -> Outcome<(Forward, Bumped)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_err("begin forward"))?;
        if !touch_network_of(&mut tx, node_id, now_ms).await? {
            let not_member = Refusal::NotMember {
                node: node_id.to_owned(),
                network: "any network (only members have forwards)".to_owned(),
            };
            return Ok(Err(
                refusal_unless_no_node(&mut tx, node_id, not_member).await?
            ));
        }
        let network = network_of(&mut tx, node_id)
            .await?
            .ok_or_else(|| corrupt("membership", node_id, "vanished within its transaction"))?;
        let facts = network_row(&mut tx, &network)
            .await?
            .ok_or_else(|| corrupt("network", &network, "vanished within its transaction"))?
            .facts()?;
        if port == facts.listen_port {
            return Ok(Err(Refusal::PortConflict { port, network }));
        }
        let existing: Option<ForwardRow> = sqlx::query_as(
            "SELECT node_id, proto, port, target, created_at_ms FROM port_forwards
             WHERE node_id = $1 AND proto = $2 AND port = $3",
        )
        .bind(node_id)
        .bind(proto)
        .bind(i64::from(port))
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("get forward"))?;
        if let Some(existing) = existing {
            if existing.target != to {
                return Ok(Err(Refusal::ForwardExists {
                    node: node_id.to_owned(),
                    proto: proto.to_owned(),
                    port,
                    to: existing.target,
                }));
            }
            return Ok(Ok((existing.into(), Vec::new())));
        }
        sqlx::query(
            "INSERT INTO port_forwards (node_id, proto, port, target, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(node_id)
        .bind(proto)
        .bind(i64::from(port))
        .bind(to)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(query_err("insert forward"))?;
        let bumped = sync(&mut tx, &network, now_ms).await?;
        tx.commit().await.map_err(query_err("commit forward"))?;
        self.durable("sync forward").await?;
        let forward = Forward {
            node_id: node_id.to_owned(),
            proto: proto.to_owned(),
            port,
            to: to.to_owned(),
            created_at_ms: now_ms,
        };
        Ok(Ok((forward, bumped)))
    }

    /// Removes a forward of `node_id`.
    pub async fn remove_forward(
        &self,
        node_id: &str,
        proto: &str,
        port: u16,
        now_ms: i64,
    ) -> Outcome<(Forward, Bumped)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_err("begin forward"))?;
        let removed: Option<ForwardRow> = sqlx::query_as(
            "DELETE FROM port_forwards WHERE node_id = $1 AND proto = $2 AND port = $3
             RETURNING node_id, proto, port, target, created_at_ms",
        )
        .bind(node_id)
        .bind(proto)
        .bind(i64::from(port))
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("delete forward"))?;
        let Some(removed) = removed else {
            let no_forward = Refusal::NoForward {
                node: node_id.to_owned(),
                proto: proto.to_owned(),
                port,
            };
            return Ok(Err(
                refusal_unless_no_node(&mut tx, node_id, no_forward).await?
            ));
        };
        let bumped = sync_network_of(&mut tx, node_id, now_ms).await?;
        tx.commit().await.map_err(query_err("commit forward"))?;
        self.durable("sync forward").await?;
        Ok(Ok((removed.into(), bumped)))
    }

    /// Forwards, of one node or of all, by node, protocol and port.
    pub async fn forwards(&self, node_id: Option<&str>) -> Result<Vec<Forward>, StorageError> {
        let rows: Vec<ForwardRow> = sqlx::query_as(
            "SELECT node_id, proto, port, target, created_at_ms FROM port_forwards
             WHERE $1 IS NULL OR node_id = $1 ORDER BY node_id, proto, port",
        )
        .bind(node_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list forwards"))?;
        Ok(rows.into_iter().map(Forward::from).collect())
    }

    /// Stores what a heartbeat of `node_id` said that peers are derived from (`report`,
    /// merged by [`NodeReport::updated_by`] into `stored`, what
    /// [`Storage::heartbeat_view`] read) when it changes anything, and then re-derives the
    /// node's network, if it is in one. A heartbeat that changes nothing writes nothing.
    /// Answers the generations bumped.
    pub async fn record_network_report(
        &self,
        node_id: &str,
        stored: Option<&NodeReport>,
        report: &NodeReport,
        now_ms: i64,
    ) -> Result<Bumped, StorageError> {
        let merged = stored.cloned().unwrap_or_default().updated_by(report);
        if stored == Some(&merged) {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(query_err("begin report"))?;
        sqlx::query(
            "INSERT INTO node_network_reports (node_id, public_key, endpoints, seen_ip, changed_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (node_id) DO UPDATE SET public_key = excluded.public_key,
                 endpoints = excluded.endpoints, seen_ip = excluded.seen_ip,
                 changed_at_ms = excluded.changed_at_ms",
        )
        .bind(node_id)
        .bind(&merged.public_key)
        .bind(to_json("reported endpoints", node_id, &merged.endpoints)?)
        .bind(merged.seen_ip.map(|ip| ip.to_string()))
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(query_err("store network report"))?;
        let bumped = sync_network_of(&mut tx, node_id, now_ms).await?;
        tx.commit().await.map_err(query_err("commit report"))?;
        if !bumped.is_empty() {
            self.durable("sync derived networks").await?;
        }
        Ok(bumped)
    }

    /// Re-derives the network `node_id` is in, if any (after its revocation).
    pub(super) async fn resync_network_of(
        &self,
        node_id: &str,
        now_ms: i64,
    ) -> Result<Bumped, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin resync"))?;
        let mut bumped = Vec::new();
        if touch_network_of(&mut tx, node_id, now_ms).await? {
            if let Some(network) = network_of(&mut tx, node_id).await? {
                bumped = sync(&mut tx, &network, now_ms).await?;
            }
        }
        tx.commit().await.map_err(query_err("commit resync"))?;
        if !bumped.is_empty() {
            self.durable("sync derived networks").await?;
        }
        Ok(bumped)
    }
}
