//! A real Mosquitto process per test: free loopback port, temp dir with config,
//! persistence and (optionally) the dynamic-security plugin. Killed on drop.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotgw_config::{DynsecConfig, MqttConfig, Secret};

/// Password of the dynsec admin user in tests.
pub const ADMIN_PASSWORD: &str = "admin-test-pw";

/// A running Mosquitto.
pub struct Mosquitto {
    /// Its loopback port.
    pub port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<Child>,
}

/// Finds an executable in `PATH` or the sbin directories (Debian puts mosquitto in /usr/sbin).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/usr/bin",
                "/usr/local/sbin",
                "/usr/local/bin",
                "/sbin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The dynamic-security plugin, from `dpkg -L mosquitto` or the usual places.
fn find_plugin() -> Option<PathBuf> {
    let listed = Command::new("dpkg")
        .args(["-L", "mosquitto"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .find(|l| l.ends_with("mosquitto_dynamic_security.so"))
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/mosquitto_dynamic_security.so",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

/// Handles a missing tool: a panic on CI (`CI=true`), a skip line elsewhere.
fn missing(what: &str) -> Option<Mosquitto> {
    let msg = format!("{what} not found: run scripts/install-test-deps.sh (installs Debian's mosquitto and mosquitto-clients)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Mosquitto {
    /// Starts a broker with anonymous access, or returns `None` (after printing a skip
    /// line) when Mosquitto is not installed outside CI.
    pub fn start() -> Option<Self> {
        Self::launch(false)
    }

    /// Starts a broker with the dynamic-security plugin, admin user `admin` with
    /// [`ADMIN_PASSWORD`], and no anonymous access.
    pub fn start_with_dynsec() -> Option<Self> {
        Self::launch(true)
    }

    fn launch(dynsec: bool) -> Option<Self> {
        let Some(binary) = find_binary("mosquitto") else {
            return missing("the mosquitto binary");
        };
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n\
             # started as root, mosquitto would switch to user mosquitto, which cannot write the temp dir\n\
             user root\nlog_dest stderr\nlog_type all\n",
            dir.path().display()
        );
        if dynsec {
            let Some(ctrl) = find_binary("mosquitto_ctrl") else {
                return missing("mosquitto_ctrl");
            };
            let Some(plugin) = find_plugin() else {
                return missing("mosquitto_dynamic_security.so");
            };
            let file = dir.path().join("dynsec.json");
            let out = Command::new(ctrl)
                .args(["dynsec", "init"])
                .arg(&file)
                .args(["admin", ADMIN_PASSWORD])
                .stdin(Stdio::null())
                .output()
                .expect("mosquitto_ctrl runs");
            assert!(
                out.status.success(),
                "mosquitto_ctrl dynsec init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            conf.push_str(&format!(
                "allow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n",
                plugin.display(),
                file.display()
            ));
        } else {
            conf.push_str("allow_anonymous true\n");
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("config written");
        let mut m = Self {
            port,
            dir,
            binary,
            child: None,
        };
        m.spawn();
        Some(m)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mosquitto exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto not listening within 5 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the process (SIGKILL: no persistence save, no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same port and persistence directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A provider config for this broker (fast reconnects for tests).
    pub fn config(&self, client_id: &str) -> MqttConfig {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            client_id: client_id.into(),
            keep_alive_secs: 5,
            reconnect_min_ms: 50,
            reconnect_max_ms: 400,
            ..MqttConfig::default()
        }
    }

    /// The dynsec admin settings of this broker.
    pub fn dynsec_config(&self) -> DynsecConfig {
        DynsecConfig {
            admin_username: "admin".into(),
            admin_password: Secret::new(ADMIN_PASSWORD),
            role_prefix: "iotgw-device-".into(),
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
