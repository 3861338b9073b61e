//! The flags every operator command takes to find its controller (see [`super::config`] for
//! the order in which flags, the data directory, the environment and the config file count).

use std::path::PathBuf;

use clap::Args;

use super::config::{self, Flags};
use super::{Client, ClientError};

/// Where the controller is and how to call it.
#[derive(Clone, Debug, Default, Args)]
pub struct ClientArgs {
    /// The data directory of a controller on this machine: use DIR/operator.toml, which
    /// `serve --data DIR` writes (URL, CA file, token file).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The controller's URL, https://HOST:PORT [env: POWERNODE_CONTROLLER].
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// The file holding the operator token [env: POWERNODE_TOKEN_FILE].
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The operator token itself (other users may see it in the process list: prefer
    /// --token-file).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// The CA certificate the controller's certificate is checked against
    /// [env: POWERNODE_CA_FILE].
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The settings file [env: POWERNODE_CONTROLLER_CONFIG; default:
    /// $XDG_CONFIG_HOME/powernode/controller.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ClientArgs {
    /// A client for the controller these flags, the environment and the files name.
    pub fn client(&self) -> anyhow::Result<Client> {
        let flags = Flags {
            controller: self.controller.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
            config: self.config.clone(),
            data: self.data.clone(),
        };
        let settings = config::resolve(&flags, &|name| std::env::var(name).ok())?;
        let client = Client::new(&settings).map_err(|e: ClientError| anyhow::Error::new(e))?;
        tracing::debug!(url = %settings.url, from = %settings.url_source, "controller");
        Ok(client)
    }
}
