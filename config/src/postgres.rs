//! The PostgreSQL store's settings (`[store.postgres]`, used when `store.kind = "postgres"`):
//! the shape, the checks serde cannot express, and the URL type that keeps its password out
//! of `config show`, logs and errors.
//!
//! This module knows nothing of sqlx: the gateway turns these settings into a connection.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::base::{Problem, Secret};

/// What replaces a password wherever a URL is shown.
pub const REDACTED: &str = "<redacted>";

/// A URL that may carry credentials: a PostgreSQL connection URL
/// (`postgres://user:password@host:5432/db?...`) or a webhook's
/// (`https://user:pass@app/hook?code=...`). `Debug`, `Display` and serialization (hence
/// `config show`, logs and error texts) replace its secrets (the user info's password, and
/// query parameters such as `password`, `token`, `code`, `key`, `sig`) with `<redacted>`;
/// only [`SecretUrl::expose`] gives the URL itself, for the one place that connects.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

/// The PostgreSQL connection URL.
pub type DatabaseUrl = SecretUrl;

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `<redacted>`, safe to print.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Whether the URL carries a password (user info or query).
    pub fn has_password(&self) -> bool {
        self.redacted() != self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Query parameters whose values are secrets wherever they appear in a URL (compared
/// without case): passwords, tokens, API keys, signatures, Azure Functions' `code`.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "pwd",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "code",
    "secret",
    "sig",
    "signature",
];

/// `url` with the password of its user info and the values of its secret query parameters
/// ([`SECRET_PARAMS`]) replaced by `<redacted>`. Text that is not a URL is returned as it is, unless it holds
/// an `@` (then everything before the last `@` could be a secret and is redacted).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return match url.rfind('@') {
            Some(at) => format!("{REDACTED}{}", &url[at..]),
            None => url.to_owned(),
        };
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    match tail.find('?') {
        Some(q) => {
            out.push_str(&tail[..=q]);
            let (query, fragment) = match tail[q + 1..].find('#') {
                Some(h) => (&tail[q + 1..q + 1 + h], &tail[q + 1 + h..]),
                None => (&tail[q + 1..], ""),
            };
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if SECRET_PARAMS.iter().any(|p| k.eq_ignore_ascii_case(p)) => {
                        format!("{k}={REDACTED}")
                    }
                    _ => kv.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
            out.push_str(fragment);
        }
        None => out.push_str(tail),
    }
    out
}

/// How the connection to PostgreSQL uses TLS (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTlsMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS always, without checking the server's certificate.
    Require,
    /// TLS, and the certificate must chain to a trusted root.
    VerifyCa,
    /// TLS, a trusted certificate, and its name must match the host.
    VerifyFull,
}

/// `[store.postgres]`: the shared database of several gateway replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresStoreConfig {
    /// Connection URL, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`. `config show`,
    /// logs and errors print it with the password as `<redacted>`. Better leave the
    /// password out and set `password` (e.g. `IOTGW_STORE__POSTGRES__PASSWORD`).
    pub url: DatabaseUrl,
    /// Password; overrides one in the URL. Never printed.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Connections in the pool of this replica (default 10). The database must allow
    /// `pool_size` x replicas connections (`max_connections`, 100 by default).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Longest a statement may run, in milliseconds, before PostgreSQL cancels it
    /// (`statement_timeout`; default 30000; 0 turns the limit off).
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Longest wait for a connection (from the pool, or a new one), in seconds (default 10).
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// TLS: `disable`, `prefer` (default), `require`, `verify-ca` or `verify-full`. A
    /// `sslmode` in the URL is overridden by this key.
    #[serde(default)]
    pub tls_mode: PostgresTlsMode,
}

/// Default pool size.
pub const fn default_pool_size() -> u32 {
    10
}

/// Default statement timeout.
pub const fn default_statement_timeout_ms() -> u64 {
    30_000
}

/// Default connect timeout.
pub const fn default_connect_timeout_secs() -> u64 {
    10
}

/// Largest pool.
pub const MAX_POOL_SIZE: u32 = 1000;

fn problem(path: String, message: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        path,
        message: message.into(),
        fix: fix.into(),
        source: None,
    }
}

/// Checks serde cannot express; `base` is the key path (`store.postgres`). Messages show
/// the URL redacted, never its password.
pub(crate) fn validate(base: &str, c: &PostgresStoreConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| format!("{base}.{k}");
    let url = c.url.expose();
    let shown = c.url.redacted();
    let example = "postgres://iotgw@db.example.com:5432/iotgw";
    match url.split_once("://") {
        None => out.push(problem(
            key("url"),
            format!("`{shown}` is not a URL"),
            format!("write postgres://USER@HOST:PORT/DATABASE, e.g. {example}"),
        )),
        Some((scheme, rest)) => {
            if scheme != "postgres" && scheme != "postgresql" {
                out.push(problem(
                    key("url"),
                    format!("`{shown}` has scheme `{scheme}`, not postgres"),
                    format!("start the URL with postgres://, e.g. {example}"),
                ));
            }
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            let host_port = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
            let host_in_query = rest.contains("host=");
            if host_port.is_empty() && !host_in_query {
                out.push(problem(
                    key("url"),
                    format!("`{shown}` names no host"),
                    format!("name the server, e.g. {example}"),
                ));
            }
            let port = match host_port.rfind(']') {
                Some(end) => host_port[end + 1..].strip_prefix(':'),
                None => host_port.rsplit_once(':').map(|(_, p)| p),
            };
            if let Some(port) = port.filter(|p| p.parse::<u16>().map_or(true, |n| n == 0)) {
                out.push(problem(
                    key("url"),
                    format!("`{shown}` has port `{port}`, not a number 1-65535"),
                    "write HOST:PORT, e.g. db:5432, or leave the port out for 5432",
                ));
            }
        }
    }
    if c.password.as_ref().is_some_and(|p| p.expose().is_empty()) {
        out.push(problem(
            key("password"),
            "the password is empty",
            "set the database user's password (e.g. IOTGW_STORE__POSTGRES__PASSWORD), or leave the key out",
        ));
    }
    if c.pool_size == 0 || c.pool_size > MAX_POOL_SIZE {
        out.push(problem(
            key("pool_size"),
            format!("{} is outside 1..={MAX_POOL_SIZE}", c.pool_size),
            "use a few connections per replica, e.g. 10 (default); the server's max_connections must cover every replica",
        ));
    }
    if c.statement_timeout_ms > 3_600_000 {
        out.push(problem(
            key("statement_timeout_ms"),
            format!("{} ms is over an hour", c.statement_timeout_ms),
            "use 0..=3600000 milliseconds; 30000 (default) cancels a stuck statement after 30 s",
        ));
    }
    if c.connect_timeout_secs == 0 || c.connect_timeout_secs > 600 {
        out.push(problem(
            key("connect_timeout_secs"),
            format!("{} is outside 1..=600", c.connect_timeout_secs),
            "use a few seconds, e.g. 10 (default)",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_the_password_in_user_info_and_query() {
        assert_eq!(
            redact_url("postgres://iotgw:s3cr%40t@db:5432/iotgw"),
            "postgres://iotgw:<redacted>@db:5432/iotgw"
        );
        assert_eq!(
            redact_url("postgresql://u:p@ss@h/d?sslmode=require&password=x#f"),
            "postgresql://u:<redacted>@h/d?sslmode=require&password=<redacted>#f"
        );
        assert_eq!(
            redact_url("postgres://iotgw@db/iotgw"),
            "postgres://iotgw@db/iotgw"
        );
        assert_eq!(redact_url("postgres://db"), "postgres://db");
        assert_eq!(
            redact_url("https://crm:hunter2@app.example.com/hook?code=AbC&tenant=t1&Token=z"),
            "https://crm:<redacted>@app.example.com/hook?code=<redacted>&tenant=t1&Token=<redacted>"
        );
        assert_eq!(redact_url("user:pw@host"), "<redacted>@host");
        let url = DatabaseUrl::new("postgres://a:hunter2@h/d");
        assert!(url.has_password());
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        assert!(!serde_json::to_string(&url)
            .expect("json")
            .contains("hunter2"));
    }

    fn config(url: &str) -> PostgresStoreConfig {
        PostgresStoreConfig {
            url: DatabaseUrl::new(url),
            password: None,
            pool_size: default_pool_size(),
            statement_timeout_ms: default_statement_timeout_ms(),
            connect_timeout_secs: default_connect_timeout_secs(),
            tls_mode: PostgresTlsMode::Prefer,
        }
    }

    fn problems(c: &PostgresStoreConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        validate("store.postgres", c, &mut out);
        out
    }

    #[test]
    fn a_good_config_passes_and_bad_keys_are_named_without_the_secret() {
        assert!(problems(&config("postgres://iotgw:pw@db:5432/iotgw")).is_empty());
        assert!(problems(&config("postgresql://iotgw@[::1]/iotgw")).is_empty());
        assert!(problems(&config("postgres:///iotgw?host=/var/run/postgresql")).is_empty());

        let bad = problems(&config("mysql://root:topsecret@db:x/iotgw"));
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.iter().all(|p| p.path == "store.postgres.url"));
        assert!(bad.iter().all(|p| !p.to_string().contains("topsecret")));

        let mut c = config("postgres://db/iotgw");
        c.pool_size = 0;
        c.statement_timeout_ms = 4_000_000;
        c.connect_timeout_secs = 0;
        c.password = Some(Secret::new(""));
        let paths: Vec<String> = problems(&c).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "store.postgres.password",
                "store.postgres.pool_size",
                "store.postgres.statement_timeout_ms",
                "store.postgres.connect_timeout_secs"
            ]
        );
    }
}
