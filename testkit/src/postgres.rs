//! PostgreSQL (`postgres:15`) for the scale-out store: one server per test binary, one
//! database per test ([`Postgres::create_database`]).

use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::{GenericImage, ImageExt};
use tokio::sync::OnceCell;

use super::Running;

/// Image name (the public one; see `deploy/images/build-local-images.sh`).
pub const IMAGE: &str = "postgres";
/// Image tag.
pub const TAG: &str = "15";
/// The server's port inside the container.
pub const PORT: u16 = 5432;
/// Superuser the tests connect as.
pub const USER: &str = "iotgw";
/// Its password (test containers only).
pub const PASSWORD: &str = "iotgw-test-pw";
/// The database created at start.
pub const DATABASE: &str = "iotgw";

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    running: Running,
}

impl Postgres {
    /// The server shared by every test of this binary (started on first use).
    pub async fn shared() -> anyhow::Result<&'static Postgres> {
        static SHARED: OnceCell<Postgres> = OnceCell::const_new();
        SHARED
            .get_or_try_init(|| Self::start(false, "postgres/shared"))
            .await
    }

    /// A server of the caller's own, on a fixed host port that survives a restart.
    pub async fn dedicated() -> anyhow::Result<Postgres> {
        Self::start(true, "postgres/dedicated").await
    }

    async fn start(fixed: bool, role: &str) -> anyhow::Result<Self> {
        // Ready twice: the init-time server logs on stdout, the final one on stderr
        // (the same wait as testcontainers-modules' Postgres image).
        let req = GenericImage::new(IMAGE, TAG)
            .with_exposed_port(PORT.tcp())
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_wait_for(WaitFor::message_on_stdout(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_USER", USER)
            .with_env_var("POSTGRES_PASSWORD", PASSWORD)
            .with_env_var("POSTGRES_DB", DATABASE)
            // Durability is not what these tests check; speed is welcome.
            .with_cmd(["postgres", "-c", "fsync=off", "-c", "max_connections=200"]);
        Ok(Self {
            running: Running::start(req, &[PORT], fixed, role).await?,
        })
    }

    /// The URL of `database` (`postgres://iotgw:...@127.0.0.1:<port>/<database>`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.running.port(PORT)
        )
    }

    /// Creates a database of the caller's own (names: lowercase letters, digits, `_`) and
    /// returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "database name {name:?}: use lowercase letters, digits and _"
        );
        let (code, out) = self
            .running
            .exec(vec![
                "psql".into(),
                "-v".into(),
                "ON_ERROR_STOP=1".into(),
                "-U".into(),
                USER.into(),
                "-d".into(),
                DATABASE.into(),
                "-c".into(),
                format!("CREATE DATABASE {name}"),
            ])
            .await?;
        anyhow::ensure!(code == 0, "CREATE DATABASE {name} failed ({code}): {out}");
        Ok(self.url(name))
    }

    /// Waits until a query answers (60 s at most).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        super::wait_ready("postgres", Duration::from_secs(60), || async {
            match self
                .running
                .exec(vec![
                    "psql".into(),
                    "-U".into(),
                    USER.into(),
                    "-d".into(),
                    DATABASE.into(),
                    "-tAc".into(),
                    "select 1".into(),
                ])
                .await
            {
                Ok((0, _)) => Ok(()),
                Ok((code, out)) => Err(format!("psql exited {code}: {out}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// The container.
    pub fn container(&self) -> &Running {
        &self.running
    }

    /// Removes a dedicated server.
    pub async fn remove(self) {
        self.running.remove().await;
    }
}
