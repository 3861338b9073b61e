//! `powernode-controller module …`: the operator's side of the module format (docs/modules.md).
//!
//! `build` makes an erofs image and its manifests from a directory, `push` uploads built
//! images under one tag as an image index, `keygen` makes a cosign key pair, `sign` signs what
//! was pushed the way `cosign sign --recursive` does (with a key, or with a key, its
//! certificate and chain and a transparency-log bundle, for keyless policies), and `assign`
//! sets the modules a node should run, through the operator API. The formats and the registry
//! protocol are `powernode_modules`'; this file only turns them into commands.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::{Args, Subcommand};
use powernode_modules::cosign;
use powernode_modules::format::{host_architecture, oci_architecture, HealthCheckSpec};
use powernode_modules::package::{self, BuildOptions, Built};
use powernode_modules::registry::{
    parse_reference, repository_of, Credential, Registry, RegistryConfig,
};
use serde::Serialize;

use crate::client::{encode, Client, ClientArgs, ClientError};
use crate::fsutil::write_atomic;
use crate::service::nodes::check_assignable;
use crate::wire::{DesiredModule, GenerationResponse, NodeDetail, SetModulesRequest};

/// Environment variable holding the password of a cosign private key (as cosign reads it).
pub const PASSWORD_ENV: &str = "COSIGN_PASSWORD";
/// File names `keygen` writes (cosign's own).
const PRIVATE_KEY_FILE: &str = "cosign.key";
const PUBLIC_KEY_FILE: &str = "cosign.pub";
/// How long to wait for a registry connection; reads give up after four times as long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `module …` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Build a module from a directory: an erofs image (made by mkfs.erofs), its module
    /// manifest and its OCI platform manifest, written side by side to --out.
    // `--version` is the module's here, not the program's.
    #[command(disable_version_flag = true)]
    Build(BuildArgs),
    /// Push built modules (one per architecture, same name and version) to a registry under
    /// one tag, as an image index; prints the reference pinned by digest.
    Push(PushArgs),
    /// Make a cosign key pair: cosign.key (encrypted with $COSIGN_PASSWORD, mode 0600) and
    /// cosign.pub (what nodes are given to trust).
    Keygen(KeygenArgs),
    /// Sign a pushed module with a cosign key: its index and every platform manifest the
    /// index lists (like `cosign sign --recursive`). The key's password is read from
    /// $COSIGN_PASSWORD. With --certificate (and --certificate-chain, --log-key) the
    /// signature carries the key's certificate, as nodes with a [keyless] policy want it.
    Sign(SignArgs),
    /// Set the modules a node should run. The list replaces the node's current one, bumps its
    /// desired-state generation, and reaches the node at once (or with the reply to its next
    /// heartbeat). The registry is asked here, the controller through its operator API.
    Assign(AssignArgs),
}

/// Options for reaching a registry.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP, not HTTPS, to the registry named in the reference (test and closed
    /// lab registries only).
    #[arg(long)]
    plain_http: bool,
    /// User name to log in to the registry with (needs --password-env).
    #[arg(long, value_name = "USER", requires = "password_env")]
    username: Option<String>,
    /// Name of the environment variable holding the registry password or token.
    #[arg(long, value_name = "VAR", requires = "username")]
    password_env: Option<String>,
}

impl RegistryArgs {
    /// `error`, with a hint when it looks like TLS spoken to a plain-HTTP registry.
    fn hint(&self, error: anyhow::Error) -> anyhow::Error {
        let text = format!("{error:#}");
        if !self.plain_http && text.contains("InvalidContentType") {
            error.context(
                "the registry does not answer TLS; if it serves plain HTTP, pass --plain-http",
            )
        } else {
            error
        }
    }

    /// A client for the registries that `references` name.
    fn client(&self, references: &[&str]) -> anyhow::Result<Registry> {
        let mut hosts: Vec<String> = Vec::new();
        for text in references {
            let reference = parse_reference(text)?;
            for host in [reference.registry(), reference.resolve_registry()] {
                if !hosts.iter().any(|h| h == host) {
                    hosts.push(host.to_owned());
                }
            }
        }
        let credentials = match (&self.username, &self.password_env) {
            (Some(username), Some(var)) => {
                let password = std::env::var(var).with_context(|| {
                    format!("--password-env {var}: the environment variable is not set")
                })?;
                hosts
                    .iter()
                    .map(|host| Credential {
                        registry: host.clone(),
                        username: username.clone(),
                        password: password.clone(),
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Registry::new(RegistryConfig {
            plain_http: if self.plain_http { hosts } else { Vec::new() },
            credentials,
            connect_timeout: Some(CONNECT_TIMEOUT),
        }))
    }
}

/// `module build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Directory whose contents become the image (its top is the module's root).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Module name: letters, digits, '-', '_', '.'.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Module version, e.g. 1.4.2.
    #[arg(long, value_name = "VERSION")]
    version: String,
    /// Default stacking priority (higher is stacked above); an assignment may override it.
    #[arg(long, value_name = "P", default_value_t = 50)]
    priority: u32,
    /// OCI architecture of the contents (amd64, arm64, …); default: this machine's.
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,
    /// A module this one needs in the same stack (repeat for several).
    #[arg(long = "depends", value_name = "MODULE")]
    depends: Vec<String>,
    /// A systemd unit the module provides (repeat for several).
    #[arg(long = "service", value_name = "UNIT")]
    services: Vec<String>,
    /// Command run in a new stack before it is switched to, program and arguments separated
    /// by spaces, e.g. "/usr/bin/tools --self-test".
    #[arg(long, value_name = "COMMAND")]
    health_check: Option<String>,
    /// Seconds the health check may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, requires = "health_check",
          value_parser = clap::value_parser!(u32).range(1..))]
    health_timeout: u32,
    /// Directory to write <name>-<version>-<arch>.{erofs,config.json,manifest.json} to.
    #[arg(long, value_name = "OUTDIR", default_value = ".")]
    out: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `module push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Built modules, one per architecture: the .manifest.json (or .erofs) files `module build`
    /// wrote.
    #[arg(value_name = "BUILT", required = true)]
    built: Vec<PathBuf>,
    /// Where to: REGISTRY/REPOSITORY:TAG, e.g. registry.example:5000/modules/tools:1.0.
    #[arg(long, value_name = "REGISTRY/REPO:TAG")]
    to: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `module keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory to write cosign.key and cosign.pub to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Replace existing cosign.key and cosign.pub.
    #[arg(long)]
    force: bool,
}

/// `module sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The module: REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:… (as `module push`
    /// printed it).
    #[arg(value_name = "REF")]
    reference: String,
    /// The cosign private key (`module keygen` or `cosign generate-key-pair` made it).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The key's certificate (PEM), issued by a Fulcio-style CA: the signature carries it, as
    /// `cosign sign --certificate` does.
    #[arg(long, value_name = "FILE")]
    certificate: Option<PathBuf>,
    /// The certificate's chain (PEM: intermediates, then the root), as
    /// `cosign sign --certificate-chain`.
    #[arg(long, value_name = "FILE", requires = "certificate")]
    certificate_chain: Option<PathBuf>,
    /// A transparency log's private key (PEM: PKCS#8 `PRIVATE KEY`, or a cosign.key opened
    /// with $COSIGN_PASSWORD): each signature gets a log bundle signed with it, integrated
    /// now. Nodes trust it through the public key in their policy's `[keyless] log_keys`.
    #[arg(long, value_name = "FILE", requires = "certificate")]
    log_key: Option<PathBuf>,
    /// The repository the signatures name instead of the one signed in, as
    /// `cosign sign --sign-container-identity` (e.g. the module's production name when
    /// signing a staging copy). Nodes pulling from elsewhere must list it in their policy's
    /// `signed_references`.
    #[arg(long, value_name = "REGISTRY/REPO")]
    sign_container_identity: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `module assign`.
#[derive(Debug, Args)]
pub struct AssignArgs {
    /// The node id (as `nodes list` prints it).
    #[arg(long, value_name = "ID")]
    node: String,
    /// The modules, as registry references (pin them by digest: REGISTRY/REPO@sha256:…). Each
    /// must have an image for the node's architecture; its name and default priority are read
    /// from the registry.
    #[arg(
        value_name = "REF",
        required_unless_present = "none",
        conflicts_with = "none"
    )]
    references: Vec<String>,
    /// Assign no modules: clear the node's list.
    #[arg(long)]
    none: bool,
    /// Override a module's priority (repeat for several).
    #[arg(long = "priority", value_name = "NAME=P", value_parser = parse_priority,
          conflicts_with = "none")]
    priorities: Vec<(String, u32)>,
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_priority(text: &str) -> Result<(String, u32), String> {
    let (name, priority) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=PRIORITY"))?;
    let priority = priority
        .parse()
        .map_err(|_| format!("priority {priority:?} is not a whole number"))?;
    if name.is_empty() {
        return Err(format!("{text:?} names no module"));
    }
    Ok((name.to_owned(), priority))
}

/// Runs one `module` subcommand.
pub async fn run(command: ModuleCommand) -> anyhow::Result<()> {
    match command {
        ModuleCommand::Build(args) => build(args).await,
        ModuleCommand::Push(args) => push(args).await,
        ModuleCommand::Keygen(args) => keygen(&args),
        ModuleCommand::Sign(args) => sign(args).await,
        ModuleCommand::Assign(args) => assign(args).await,
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What `module build --json` prints.
#[derive(Debug, Serialize)]
struct BuildOutput<'a> {
    name: &'a str,
    version: &'a str,
    architecture: &'a str,
    image: &'a Path,
    config: &'a Path,
    manifest: &'a Path,
    image_digest: &'a str,
    fsverity_digest: &'a str,
    manifest_digest: &'a str,
    size: u64,
}

async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let health_check = match &args.health_check {
        None => None,
        Some(text) => {
            let command: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
            ensure!(!command.is_empty(), "--health-check is empty");
            Some(HealthCheckSpec {
                command,
                timeout_s: args.health_timeout,
            })
        }
    };
    let options = BuildOptions {
        name: args.name,
        version: args.version,
        priority: args.priority,
        architecture: args.arch.map_or_else(
            || host_architecture().to_owned(),
            |a| oci_architecture(&a).to_owned(),
        ),
        dependencies: args.depends,
        services: args.services,
        health_check,
    };
    let (dir, out) = (args.dir, args.out);
    let built = tokio::task::spawn_blocking(move || package::build(&dir, &options, &out))
        .await
        .context("the build task failed")?
        .context("cannot build the module")?;
    let size = std::fs::metadata(&built.image)
        .with_context(|| format!("reading {}", built.image.display()))?
        .len();
    if args.json {
        return print_json(&BuildOutput {
            name: &built.module.name,
            version: &built.module.version,
            architecture: &built.module.architecture,
            image: &built.image,
            config: &built.config,
            manifest: &built.manifest,
            image_digest: &built.image_digest,
            fsverity_digest: &built.fsverity_digest,
            manifest_digest: &built.manifest_digest,
            size,
        });
    }
    println!(
        "built {} {} for {} ({} files)",
        built.module.name,
        built.module.version,
        built.module.architecture,
        built.module.files.len()
    );
    println!(
        "  image             {} ({size} bytes)",
        built.image.display()
    );
    println!("  module manifest   {}", built.config.display());
    println!("  OCI manifest      {}", built.manifest.display());
    println!("  image digest      {}", built.image_digest);
    println!("  fs-verity digest  {}", built.fsverity_digest);
    println!("  manifest digest   {}", built.manifest_digest);
    Ok(())
}

/// What `module push --json` prints.
#[derive(Debug, Serialize)]
struct PushOutput {
    /// `registry/repository:tag` as pushed.
    reference: String,
    /// `registry/repository@<index digest>`: what to assign.
    pinned: String,
    index_digest: String,
    /// Platform manifest digest by architecture.
    manifests: BTreeMap<String, String>,
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let target = parse_reference(&args.to).context("--to")?;
    ensure!(
        target.digest().is_none(),
        "--to {}: give a tag (REGISTRY/REPO:TAG), not a digest",
        args.to
    );
    let last = args.to.rsplit('/').next().unwrap_or_default();
    let tag = match target.tag() {
        Some(tag) if last.contains(':') => tag.to_owned(),
        _ => bail!(
            "--to {}: name the tag to push to (REGISTRY/REPO:TAG)",
            args.to
        ),
    };
    let repository = repository_of(&target);
    let mut built: Vec<Built> = Vec::new();
    for path in &args.built {
        built.push(
            package::load_built(path)
                .with_context(|| format!("{} is not a built module", path.display()))?,
        );
    }
    let registry = args.registry.client(&[&args.to])?;
    let pushed = package::push(&registry, &repository, &tag, &built)
        .await
        .with_context(|| format!("cannot push to {}", args.to))
        .map_err(|e| args.registry.hint(e))?;
    let output = PushOutput {
        pinned: format!("{repository}@{}", pushed.index_digest),
        reference: pushed.reference,
        index_digest: pushed.index_digest,
        manifests: pushed.manifests,
    };
    if args.json {
        return print_json(&output);
    }
    println!("pushed {}", output.reference);
    println!("  pinned  {}", output.pinned);
    for (arch, digest) in &output.manifests {
        println!("  {arch:<7} {digest}");
    }
    Ok(())
}

/// The password of a cosign key, from `$COSIGN_PASSWORD` (empty is a valid password).
fn key_password() -> anyhow::Result<String> {
    match std::env::var(PASSWORD_ENV) {
        Ok(password) => Ok(password),
        Err(std::env::VarError::NotPresent) => {
            bail!("set {PASSWORD_ENV} to the key's password (it may be empty: {PASSWORD_ENV}= )")
        }
        Err(std::env::VarError::NotUnicode(_)) => bail!("{PASSWORD_ENV} is not valid UTF-8"),
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let password = key_password()?;
    let private = args.out.join(PRIVATE_KEY_FILE);
    let public = args.out.join(PUBLIC_KEY_FILE);
    if !args.force {
        for path in [&private, &public] {
            ensure!(
                !path.exists(),
                "{} exists; pass --force to replace it",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let key = cosign::SigningKey::generate().context("cannot generate a key")?;
    let private_pem = key
        .to_cosign_pem(password.as_bytes())
        .context("cannot encrypt the key")?;
    let public_pem = key.public_key_pem();
    write_atomic(&private, private_pem.as_bytes(), 0o600)?;
    write_atomic(&public, public_pem.as_bytes(), 0o644)?;
    println!(
        "private key  {} (encrypted with ${PASSWORD_ENV})",
        private.display()
    );
    println!("public key   {}", public.display());
    Ok(())
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A log's private key: PKCS#8 PEM as openssl and rcgen write it, or a cosign.key.
fn log_key(path: &Path) -> anyhow::Result<cosign::SigningKey> {
    let pem = read_text(path)?;
    let key = if pem.contains("-----BEGIN PRIVATE KEY-----") {
        cosign::SigningKey::from_pkcs8_pem(&pem)
    } else {
        cosign::SigningKey::from_cosign_pem(&pem, key_password()?.as_bytes())
    };
    key.with_context(|| format!("cannot open the log key {}", path.display()))
}

async fn sign(args: SignArgs) -> anyhow::Result<()> {
    let password = key_password()?;
    let pem = read_text(&args.key)?;
    let key = cosign::SigningKey::from_cosign_pem(&pem, password.as_bytes())
        .with_context(|| format!("cannot open {}", args.key.display()))?;
    let certificate = match &args.certificate {
        None => None,
        Some(path) => {
            let chain = args
                .certificate_chain
                .as_deref()
                .map(read_text)
                .transpose()?;
            let certificate =
                cosign::SigningCertificate::new(&key, &read_text(path)?, chain.as_deref())
                    .with_context(|| {
                        format!(
                            "cannot sign with {} and {}",
                            args.key.display(),
                            path.display()
                        )
                    })?;
            Some(certificate)
        }
    };
    let log = args.log_key.as_deref().map(log_key).transpose()?;
    let signer = cosign::Signer {
        key: &key,
        certificate: certificate.as_ref(),
        log: log.as_ref(),
    };
    let registry = args.registry.client(&[&args.reference])?;
    let signed = package::sign_with(
        &registry,
        &args.reference,
        &signer,
        args.sign_container_identity.as_deref(),
    )
    .await
    .with_context(|| format!("cannot sign {}", args.reference))
    .map_err(|e| args.registry.hint(e))?;
    if args.json {
        return print_json(&signed);
    }
    for s in &signed {
        println!(
            "{:<14}  {:<8} {}  ({} signature{} in :{})",
            if s.already_signed {
                "already signed"
            } else {
                "signed"
            },
            s.what,
            s.digest,
            s.signatures,
            if s.signatures == 1 { "" } else { "s" },
            s.signature_tag,
        );
    }
    Ok(())
}

/// What `module assign --json` prints.
#[derive(Debug, Serialize)]
struct AssignOutput<'a> {
    node: &'a str,
    generation: u64,
    modules: &'a [DesiredModule],
}

async fn assign(args: AssignArgs) -> anyhow::Result<()> {
    let client = args.client.client()?;
    let (generation, modules) = assign_with(&client, &args).await?;
    if args.json {
        return print_json(&AssignOutput {
            node: &args.node,
            generation,
            modules: &modules,
        });
    }
    println!("node {}: desired generation {generation}", args.node);
    if modules.is_empty() {
        println!("  no modules");
    }
    for m in &modules {
        println!("  {}  priority {}  {}", m.name, m.priority, m.reference);
    }
    Ok(())
}

/// Resolves the references for the node's architecture and sends the list. The node is
/// fetched first (its architecture picks the image) and checked with the API's own rule
/// before the registry is asked anything; the API checks everything again when the list
/// arrives.
async fn assign_with(
    client: &Client,
    args: &AssignArgs,
) -> anyhow::Result<(u64, Vec<DesiredModule>)> {
    let path = format!("/api/v1/nodes/{}", encode(&args.node));
    let node: NodeDetail = client.get(&path).await?;
    check_assignable(&node.node.id, node.node.revoked_at_ms).map_err(ClientError::from)?;
    let arch = oci_architecture(&node.node.arch);
    let mut modules: Vec<DesiredModule> = Vec::new();
    if !args.references.is_empty() {
        let refs: Vec<&str> = args.references.iter().map(String::as_str).collect();
        let registry = args.registry.client(&refs)?;
        for reference in &args.references {
            let resolved = registry
                .resolve(reference, arch)
                .await
                .with_context(|| {
                    format!("{reference} cannot be assigned to {} ({arch})", args.node)
                })
                .map_err(|e| args.registry.hint(e))?;
            if let Some(other) = modules.iter().find(|m| m.name == resolved.module.name) {
                bail!(
                    "{reference} and {} are both module {}; a node runs one of each name",
                    other.reference,
                    other.name
                );
            }
            modules.push(DesiredModule {
                name: resolved.module.name,
                reference: reference.clone(),
                priority: resolved.module.priority,
            });
        }
    }
    let mut overridden = HashSet::new();
    for (name, priority) in &args.priorities {
        let module = modules
            .iter_mut()
            .find(|m| &m.name == name)
            .with_context(|| format!("--priority {name}=…: no module {name} is assigned"))?;
        ensure!(overridden.insert(name), "--priority {name}=… given twice");
        module.priority = *priority;
    }
    let reply: GenerationResponse = client
        .put(
            &format!("{path}/desired/modules"),
            &SetModulesRequest {
                modules: modules.clone(),
            },
        )
        .await?;
    Ok((reply.generation, modules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_overrides_parse() {
        assert_eq!(parse_priority("tools=70"), Ok(("tools".to_owned(), 70)));
        for bad in ["tools", "=5", "tools=", "tools=-1", "tools=x"] {
            assert!(parse_priority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_hint_only_when_it_helps() {
        let tls_to_http = || anyhow::anyhow!("received corrupt message of type InvalidContentType");
        let args = |plain_http| RegistryArgs {
            plain_http,
            username: None,
            password_env: None,
        };
        assert!(format!("{:#}", args(false).hint(tls_to_http())).contains("--plain-http"));
        assert!(!format!("{:#}", args(true).hint(tls_to_http())).contains("--plain-http"));
    }
}
