//! Where the CLI finds the controller: its URL, the CA that signed its certificate, and the
//! operator token, as kubectl finds a cluster.
//!
//! Each setting comes from the first of these that has it:
//!
//! 1. its flag: `--controller URL`, `--token TOKEN` or `--token-file FILE`, `--ca-file FILE`;
//! 2. `--data DIR`: `DIR/operator.toml`, which `serve --data DIR` writes (a flag too, so it
//!    beats the environment: the scripts that name a data directory keep talking to that
//!    controller whatever the operator's shell exports);
//! 3. the environment: `POWERNODE_CONTROLLER`, `POWERNODE_TOKEN_FILE`, `POWERNODE_CA_FILE`;
//! 4. the config file: `--config FILE`, else `$POWERNODE_CONTROLLER_CONFIG`, else
//!    `$XDG_CONFIG_HOME/powernode/controller.toml` (`~/.config/…` without `XDG_CONFIG_HOME`),
//!    which may be absent.
//!
//! A file has the keys `url`, `ca_file` and `token_file`; relative paths in it are relative
//! to the file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Variable naming the controller's URL.
pub const ENV_CONTROLLER: &str = "POWERNODE_CONTROLLER";
/// Variable naming the file holding the operator token.
pub const ENV_TOKEN_FILE: &str = "POWERNODE_TOKEN_FILE";
/// Variable naming the CA certificate file.
pub const ENV_CA_FILE: &str = "POWERNODE_CA_FILE";
/// Variable naming the config file.
pub const ENV_CONFIG: &str = "POWERNODE_CONTROLLER_CONFIG";
/// File `serve` writes in its data directory for the CLI (mode 0600).
pub const OPERATOR_CONFIG_FILE: &str = "operator.toml";

/// The settings as a file states them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// `https://HOST:PORT` of the controller.
    pub url: Option<String>,
    /// The CA certificate (PEM) the controller's certificate is checked against.
    pub ca_file: Option<PathBuf>,
    /// The file holding the operator token.
    pub token_file: Option<PathBuf>,
}

/// The flags of an operator command.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    /// `--controller`.
    pub controller: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--data`.
    pub data: Option<PathBuf>,
}

/// The operator token, or where to read it.
#[derive(Clone, PartialEq, Eq)]
pub enum Token {
    /// Given on the command line.
    Inline(String),
    /// In this file.
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Inline(_) => f.write_str("Token::Inline(..)"),
            Token::File(path) => f.debug_tuple("Token::File").field(path).finish(),
        }
    }
}

/// Where one setting came from, for the messages that name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A flag.
    Flag(&'static str),
    /// A variable of the environment.
    Env(&'static str),
    /// A file.
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "{flag}"),
            Source::Env(var) => write!(f, "${var}"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Everything the client needs, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `https://HOST:PORT`.
    pub url: String,
    /// Where the URL came from.
    pub url_source: Source,
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// The operator token.
    pub token: Token,
}

/// Why the settings cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named by a flag or the environment cannot be read.
    #[error("cannot read {path} (named by {by}): {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What named it.
        by: Source,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `--data DIR` names a directory without operator.toml.
    #[error(
        "{path} does not exist: `powernode-controller serve --data {dir}` writes it when it \
         starts (is it running, or has it run?)"
    )]
    NoOperatorConfig {
        /// The file.
        path: PathBuf,
        /// The data directory.
        dir: String,
    },
    /// A file does not parse (the message says where).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A setting is not set anywhere.
    #[error(
        "no {what}: pass {flag}, set ${env}, or put {key} in {default} (or `--data DIR` for the \
         controller of that data directory)"
    )]
    Missing {
        /// The setting.
        what: &'static str,
        /// Its flag.
        flag: &'static str,
        /// Its variable.
        env: &'static str,
        /// Its key in a file.
        key: &'static str,
        /// The default config file.
        default: String,
    },
    /// The URL is not `https://HOST[:PORT]`.
    #[error("{source_of}: {url:?} is not https://HOST[:PORT] (the controller speaks only HTTPS)")]
    BadUrl {
        /// The URL.
        url: String,
        /// Where it came from.
        source_of: Source,
    },
}

/// The default config file: `$XDG_CONFIG_HOME/powernode/controller.toml`, or
/// `$HOME/.config/powernode/controller.toml`; `None` when neither variable is set.
pub fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(base.join("powernode").join("controller.toml"))
}

/// Reads a settings file; `Ok(None)` when it is absent and `optional`.
fn read_file(path: &Path, by: Source, optional: bool) -> Result<Option<FileSettings>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if optional && err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                by,
                source,
            })
        }
    };
    let mut settings: FileSettings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    // Relative paths are the file's neighbours, wherever the command runs.
    let dir = path.parent().unwrap_or(Path::new("."));
    for p in [&mut settings.ca_file, &mut settings.token_file]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    }
    Ok(Some(settings))
}

/// The first of `layers` that has a value, with its source.
fn first<T: Clone>(layers: &[(Option<T>, Source)]) -> Option<(T, Source)> {
    layers
        .iter()
        .find_map(|(value, source)| value.clone().map(|v| (v, source.clone())))
}

/// Resolves the settings from `flags`, the environment (`env` looks a variable up) and the
/// files they name (see the module doc for the order).
pub fn resolve(
    flags: &Flags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigError> {
    let env_var = |name: &str| env(name).filter(|v| !v.is_empty());
    let data = match &flags.data {
        None => None,
        Some(dir) => {
            let path = dir.join(OPERATOR_CONFIG_FILE);
            match read_file(&path, Source::Flag("--data"), true)? {
                Some(settings) => Some((settings, Source::File(path))),
                None => {
                    return Err(ConfigError::NoOperatorConfig {
                        path,
                        dir: dir.display().to_string(),
                    })
                }
            }
        }
    };
    let default = default_config_path(env);
    let file = match (&flags.config, env_var(ENV_CONFIG)) {
        (Some(path), _) => read_file(path, Source::Flag("--config"), false)?
            .map(|s| (s, Source::File(path.clone()))),
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            read_file(&path, Source::Env(ENV_CONFIG), false)?.map(|s| (s, Source::File(path)))
        }
        (None, None) => match &default {
            Some(path) => read_file(path, Source::File(path.clone()), true)?
                .map(|s| (s, Source::File(path.clone()))),
            None => None,
        },
    };
    let from_data = |f: fn(&FileSettings) -> Option<String>| {
        (
            data.as_ref().and_then(|(s, _)| f(s)),
            data.as_ref()
                .map_or(Source::Flag("--data"), |(_, src)| src.clone()),
        )
    };
    let from_file = |f: fn(&FileSettings) -> Option<String>| {
        (
            file.as_ref().and_then(|(s, _)| f(s)),
            file.as_ref()
                .map_or(Source::Flag("--config"), |(_, src)| src.clone()),
        )
    };
    let default_text = default.as_ref().map_or_else(
        || "$XDG_CONFIG_HOME/powernode/controller.toml".to_owned(),
        |p| p.display().to_string(),
    );
    let missing = |what, flag, env, key| ConfigError::Missing {
        what,
        flag,
        env,
        key,
        default: default_text.clone(),
    };
    let path_text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());

    let (url, url_source) = first(&[
        (flags.controller.clone(), Source::Flag("--controller")),
        from_data(|s| s.url.clone()),
        (env_var(ENV_CONTROLLER), Source::Env(ENV_CONTROLLER)),
        from_file(|s| s.url.clone()),
    ])
    .ok_or_else(|| missing("controller URL", "--controller URL", ENV_CONTROLLER, "url"))?;
    let url = normalize_url(&url).ok_or_else(|| ConfigError::BadUrl {
        url: url.clone(),
        source_of: url_source.clone(),
    })?;
    let (ca_file, _) = first(&[
        (path_text(&flags.ca_file), Source::Flag("--ca-file")),
        from_data(|s| s.ca_file.as_ref().map(|p| p.to_string_lossy().into_owned())),
        (env_var(ENV_CA_FILE), Source::Env(ENV_CA_FILE)),
        from_file(|s| s.ca_file.as_ref().map(|p| p.to_string_lossy().into_owned())),
    ])
    .ok_or_else(|| missing("CA file", "--ca-file FILE", ENV_CA_FILE, "ca_file"))?;
    let token = match &flags.token {
        Some(token) => Token::Inline(token.clone()),
        None => {
            let (file, _) = first(&[
                (path_text(&flags.token_file), Source::Flag("--token-file")),
                from_data(|s| {
                    s.token_file
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned())
                }),
                (env_var(ENV_TOKEN_FILE), Source::Env(ENV_TOKEN_FILE)),
                from_file(|s| {
                    s.token_file
                        .as_ref()
                        .map(|p| p.to_string_lossy().into_owned())
                }),
            ])
            .ok_or_else(|| {
                missing(
                    "operator token",
                    "--token-file FILE (or --token)",
                    ENV_TOKEN_FILE,
                    "token_file",
                )
            })?;
            Token::File(PathBuf::from(file))
        }
    };
    Ok(Settings {
        url,
        url_source,
        ca_file: PathBuf::from(ca_file),
        token,
    })
}

/// `https://HOST[:PORT]` without a trailing `/`; `None` for any other scheme, a path, a
/// query, or no host.
pub fn normalize_url(text: &str) -> Option<String> {
    let rest = text.trim().strip_prefix("https://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let uri: hyper::Uri = format!("https://{authority}/").parse().ok()?;
    uri.host()?;
    Some(format!("https://{authority}"))
}

/// The text of `DIR/operator.toml` for a controller at `url` whose CA certificate and
/// operator token are the files named: TOML, each path a basic string.
pub fn operator_config_text(url: &str, ca_file: &Path, token_file: &Path) -> Option<String> {
    // JSON's string escapes are TOML's (U+007F aside, which JSON leaves raw).
    let quote = |text: &str| serde_json::to_string(text).map(|q| q.replace('\u{7f}', "\\u007F"));
    Some(format!(
        "# Written by `powernode-controller serve` at every start: where the operator commands\n\
         # run with `--data {dir}` find this controller.\n\
         url = {url}\nca_file = {ca}\ntoken_file = {token}\n",
        dir = ca_file.parent()?.display(),
        url = quote(url).ok()?,
        ca = quote(ca_file.to_str()?).ok()?,
        token = quote(token_file.to_str()?).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn urls_are_https_host_and_port_only() {
        assert_eq!(
            normalize_url("https://127.0.0.1:8443/").as_deref(),
            Some("https://127.0.0.1:8443")
        );
        assert_eq!(
            normalize_url("https://[::1]:8443").as_deref(),
            Some("https://[::1]:8443")
        );
        for bad in [
            "http://127.0.0.1:8443",
            "127.0.0.1:8443",
            "https://",
            "https://h/api",
            "https://u@h",
        ] {
            assert_eq!(normalize_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn flags_beat_the_data_directory_which_beats_env_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = write(
            dir.path(),
            "controller.toml",
            "url = \"https://file:1\"\nca_file = \"file-ca.pem\"\ntoken_file = \"/file/token\"\n",
        );
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        write(
            &data,
            OPERATOR_CONFIG_FILE,
            "url = \"https://data:2\"\nca_file = \"/data/ca.pem\"\n",
        );
        let env = env_of(&[
            (ENV_CONTROLLER, "https://env:3"),
            (ENV_CA_FILE, "/env/ca.pem"),
            (ENV_TOKEN_FILE, "/env/token"),
            (ENV_CONFIG, config.to_str().unwrap()),
        ]);

        // The file alone, its relative path made the file's neighbour.
        let only_file = resolve(
            &Flags::default(),
            &env_of(&[(ENV_CONFIG, config.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(only_file.url, "https://file:1");
        assert_eq!(only_file.ca_file, dir.path().join("file-ca.pem"));
        assert_eq!(only_file.token, Token::File("/file/token".into()));

        // The environment over the file.
        let s = resolve(&Flags::default(), &env).unwrap();
        assert_eq!(
            (s.url.as_str(), s.url_source.clone()),
            ("https://env:3", Source::Env(ENV_CONTROLLER))
        );
        assert_eq!(s.ca_file, PathBuf::from("/env/ca.pem"));

        // --data over the environment, where it says something; the environment fills in.
        let with_data = Flags {
            data: Some(data.clone()),
            ..Flags::default()
        };
        let s = resolve(&with_data, &env).unwrap();
        assert_eq!(s.url, "https://data:2");
        assert_eq!(s.ca_file, PathBuf::from("/data/ca.pem"));
        assert_eq!(s.token, Token::File("/env/token".into()));

        // Flags over everything.
        let flags = Flags {
            controller: Some("https://flag:4".into()),
            ca_file: Some("/flag/ca.pem".into()),
            token: Some("secret".into()),
            ..with_data
        };
        let s = resolve(&flags, &env).unwrap();
        assert_eq!(
            (s.url.as_str(), s.url_source),
            ("https://flag:4", Source::Flag("--controller"))
        );
        assert_eq!(s.ca_file, PathBuf::from("/flag/ca.pem"));
        assert_eq!(s.token, Token::Inline("secret".into()));
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let none = env_of(&[("XDG_CONFIG_HOME", dir.path().to_str().unwrap())]);
        let err = resolve(&Flags::default(), &none).unwrap_err().to_string();
        assert!(
            err.contains("no controller URL") && err.contains("--controller"),
            "{err}"
        );
        assert!(
            err.contains(
                &dir.path()
                    .join("powernode/controller.toml")
                    .display()
                    .to_string()
            ),
            "{err}"
        );

        let err = resolve(
            &Flags {
                data: Some(dir.path().join("nothing")),
                ..Flags::default()
            },
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("operator.toml does not exist"), "{err}");

        let bad = write(
            dir.path(),
            "bad.toml",
            "url = \"https://h:1\"\ncolour = \"red\"\n",
        );
        let err = resolve(
            &Flags {
                config: Some(bad.clone()),
                ..Flags::default()
            },
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.toml") && err.contains("colour"), "{err}");
        assert!(err.contains("line 2"), "says where: {err}");

        let err = resolve(
            &Flags {
                controller: Some("http://h:1".into()),
                ..Flags::default()
            },
            &none,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--controller") && err.contains("only HTTPS"),
            "{err}"
        );
    }

    #[test]
    fn the_operator_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("we\"ird\\ca.crt.pem");
        let token = dir.path().join("operator.token");
        let text = operator_config_text("https://127.0.0.1:8443", &ca, &token).unwrap();
        let path = write(dir.path(), OPERATOR_CONFIG_FILE, &text);
        let read = read_file(&path, Source::File(path.clone()), false)
            .unwrap()
            .unwrap();
        assert_eq!(
            read,
            FileSettings {
                url: Some("https://127.0.0.1:8443".into()),
                ca_file: Some(ca),
                token_file: Some(token),
            }
        );
    }
}
