//! Loading: defaults -> TOML file -> `IOTGW_*` environment, with every problem reported at
//! once, each with its key path, where the value came from, and how to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;

pub use crate::base::Problem;
use crate::model::Config;
use crate::validate::validate;

/// The configuration is not usable; every problem found is listed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in key order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{n} configuration problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Where to load from.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The TOML file; None means the embedded default.
    pub file: Option<PathBuf>,
    /// Read `IOTGW_*` variables (tests turn this off).
    pub env: bool,
    /// Provider kinds compiled into this binary.
    pub built_kinds: Vec<&'static str>,
}

/// Environment variables that belong to the command line, not the config tree.
const CLI_ENV_KEYS: &[&str] = &["config", "log", "log_format"];

fn figment(opts: &LoadOptions) -> Result<Figment, ConfigError> {
    let mut fig = match &opts.file {
        None => Figment::from(Serialized::defaults(Config::embedded_default())),
        Some(path) => {
            if !path.exists() {
                return Err(single(
                    "",
                    format!("config file {} does not exist", path.display()),
                    "give the path of an existing TOML file, or run without --config for the embedded default (see gateway.example.toml)",
                ));
            }
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(path))
        }
    };
    if opts.env {
        fig = fig.merge(Env::prefixed("IOTGW_").split("__").ignore(CLI_ENV_KEYS));
    }
    Ok(fig)
}

fn single(path: &str, message: String, fix: &str) -> ConfigError {
    ConfigError {
        problems: vec![Problem {
            path: path.into(),
            message,
            fix: fix.into(),
            source: None,
        }],
    }
}

/// Loads and validates. On failure, every problem is reported.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfigError> {
    let fig = figment(opts)?;
    let mut problems = Vec::new();
    // Merge the layers into one tree first; a syntax error in the file stops here.
    let mut tree: Dict = match fig.extract::<Dict>() {
        Ok(d) => d,
        Err(e) => {
            for err in e {
                problems.push(problem_from(&fig, &err));
            }
            return Err(ConfigError { problems });
        }
    };
    // Deserialize; on each error record it, remove the offending key and go again, so one
    // run reports every structural problem instead of the first.
    let mut config = None;
    for _ in 0..64 {
        let attempt = Figment::from(Serialized::defaults(&tree)).extract::<Config>();
        match attempt {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(errs) => {
                let mut progressed = false;
                let errs: Vec<figment::Error> =
                    errs.into_iter().flat_map(|e| refine(&tree, e)).collect();
                for err in errs {
                    let p = problem_from(&fig, &err);
                    let key = removal_path(&err);
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                    if !key.is_empty() && remove_path(&mut tree, &key) {
                        progressed = true;
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
    }
    let Some(config) = config else {
        return Err(ConfigError { problems });
    };
    for p in validate(&config, &opts.built_kinds) {
        problems.push(p);
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by(|a, b| a.path.cmp(&b.path));
        Err(ConfigError { problems })
    }
}

/// Errors inside a `kind`-tagged table (`providers.NAME`, `sinks.NAME`) come back from
/// serde without the key that is wrong; deserializing that table as its concrete type
/// recovers the full path. Other errors pass through.
fn refine(tree: &Dict, err: figment::Error) -> Vec<figment::Error> {
    let [section, name] = err.path.as_slice() else {
        return vec![err];
    };
    if !matches!(section.as_str(), "providers" | "sinks")
        || matches!(err.kind, Kind::UnknownVariant(..))
    {
        return vec![err];
    }
    let Some(Value::Dict(_, table)) = tree
        .get(section)
        .and_then(|v| v.as_dict())
        .and_then(|d| d.get(name))
    else {
        return vec![err];
    };
    let mut table = table.clone();
    let kind = match table.remove("kind") {
        Some(Value::String(_, k)) => k,
        _ => return vec![err],
    };
    fn errors_of<T: serde::de::DeserializeOwned>(t: &Dict) -> Vec<figment::Error> {
        match Figment::from(Serialized::defaults(t)).extract::<T>() {
            Ok(_) => Vec::new(),
            Err(e) => e.into_iter().collect(),
        }
    }
    let precise = match (section.as_str(), kind.as_str()) {
        ("providers", "mqtt") => errors_of::<crate::MqttConfig>(&table),
        ("providers", "aws_iot_core") => errors_of::<crate::AwsIotCoreConfig>(&table),
        ("providers", "gcp_pubsub") => errors_of::<crate::GcpPubSubConfig>(&table),
        ("providers", "azure_iot_hub") => errors_of::<crate::AzureIotHubConfig>(&table),
        ("sinks", "stdout") => errors_of::<crate::StdoutSinkConfig>(&table),
        ("sinks", "file") => errors_of::<crate::FileSinkConfig>(&table),
        ("sinks", "webhook") => errors_of::<crate::WebhookSinkConfig>(&table),
        ("sinks", "dataverse") => errors_of::<crate::DataverseSinkConfig>(&table),
        _ => Vec::new(),
    };
    if precise.is_empty() {
        return vec![err];
    }
    precise
        .into_iter()
        .map(|mut e| {
            let mut path = vec![section.clone(), name.clone()];
            path.append(&mut e.path);
            e.path = path;
            e
        })
        .collect()
}

/// The key to drop so the next attempt gets past this error.
fn removal_path(err: &figment::Error) -> Vec<String> {
    let mut path = err.path.clone();
    if let Kind::UnknownField(field, _) = &err.kind {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    path
}

fn remove_path(tree: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => tree.remove(last).is_some(),
        [first, rest @ ..] => match tree.get_mut(first) {
            Some(Value::Dict(_, inner)) => remove_path(inner, rest),
            _ => false,
        },
    }
}

fn problem_from(fig: &Figment, err: &figment::Error) -> Problem {
    let mut path = err.path.join(".");
    let (message, fix) = match &err.kind {
        Kind::UnknownField(field, expected) => {
            push_leaf(&mut path, field);
            let suggestion = closest(field, expected);
            let fix = match suggestion {
                Some(s) => format!(
                    "did you mean `{s}`? known keys here: {}",
                    expected.join(", ")
                ),
                None if expected.is_empty() => "remove it".to_string(),
                None => format!("remove it; known keys here: {}", expected.join(", ")),
            };
            (format!("unknown key `{field}`"), fix)
        }
        Kind::MissingField(field) => {
            push_leaf(&mut path, field);
            (
                format!("required key `{field}` is missing"),
                "add it (see gateway.example.toml for every key with its meaning)".to_string(),
            )
        }
        Kind::UnknownVariant(got, expected) => (
            format!("`{got}` is not a valid choice"),
            format!("use one of: {}", expected.join(", ")),
        ),
        Kind::InvalidType(actual, expected) => {
            let expected = plain_type(expected);
            (
                format!("expected {expected}, found {}", shown(actual, &path)),
                format!("give {expected}"),
            )
        }
        Kind::InvalidValue(actual, expected) => (
            format!(
                "invalid value {}, expected {expected}",
                shown(actual, &path)
            ),
            format!("give {expected}"),
        ),
        Kind::Message(m) => (
            m.clone(),
            "correct the value (see gateway.example.toml)".to_string(),
        ),
        other => (
            other.to_string(),
            "correct the value (see gateway.example.toml)".to_string(),
        ),
    };
    let source = fig
        .find_metadata(&path)
        .or_else(|| fig.find_metadata(&err.path.join(".")))
        .map(|m| match &m.source {
            Some(figment::Source::File(f)) => format!("{} ({})", m.name, f.display()),
            _ => m.name.to_string(),
        })
        .filter(|s| !s.contains("Serialized"));
    Problem {
        path,
        message,
        fix,
        source,
    }
}

/// Keys whose values are secrets (or carry them): a wrong value there is described by its
/// kind only, never echoed.
const SECRET_KEYS: &[&str] = &[
    "token",
    "password",
    "secret",
    "key",
    "connection_string",
    "url",
    "credentials",
];

/// The value figment found, as an error may show it: itself, or only its kind when the key
/// at `path` holds secrets.
fn shown(actual: &figment::error::Actual, path: &str) -> String {
    use figment::error::Actual;
    let leaf = path.rsplit('.').next().unwrap_or(path).to_ascii_lowercase();
    if !SECRET_KEYS.iter().any(|k| leaf.contains(k)) {
        return actual.to_string();
    }
    match actual {
        Actual::Bool(_) => "a boolean".into(),
        Actual::Unsigned(_) | Actual::Signed(_) => "a whole number".into(),
        Actual::Float(_) => "a number".into(),
        Actual::Char(_) | Actual::Str(_) => "text (not shown: the key holds a secret)".into(),
        Actual::Bytes(_) => "bytes".into(),
        other => other.to_string(),
    }
}

/// Serde's type names in words a config author knows.
fn plain_type(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535 (e.g. a port)".into(),
        "u32" | "u64" | "usize" => "a whole number, 0 or more".into(),
        "i32" | "i64" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        other => other.to_string(),
    }
}

/// Appends `leaf` to a dotted path unless it already ends with it.
fn push_leaf(path: &mut String, leaf: &str) {
    if path == leaf || path.ends_with(&format!(".{leaf}")) {
        return;
    }
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(leaf);
}

/// The expected key closest to `got`, if close enough to be a typo.
fn closest<'a>(got: &str, expected: &'a [&'static str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (levenshtein(got, e), *e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Loads a TOML file without the environment (for tests and `check-config --no-env`).
pub fn load_file(path: &Path, built_kinds: &[&'static str]) -> Result<Config, ConfigError> {
    load(&LoadOptions {
        file: Some(path.to_owned()),
        env: false,
        built_kinds: built_kinds.to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    fn opts(file: &str) -> LoadOptions {
        LoadOptions {
            file: Some(file.into()),
            env: true,
            built_kinds: vec!["mqtt"],
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever a config file holds, loading it answers `Ok` or problems that each
        /// name a key path (or the file) and a fix; it never panics.
        #[test]
        fn any_config_file_loads_or_is_refused_with_named_problems(
            section in proptest::sample::select(vec![
                "api", "store", "pipeline", "commands", "retention", "health", "routing",
                "providers.edge", "sinks.hook", "rules.hot", "replica", "embedded_broker",
                "readings", "alerts", "definitions.commands.go", "definitions.properties.p",
            ]),
            key in "[a-z_]{1,20}",
            value in proptest::prop_oneof![
                proptest::prelude::any::<i64>().prop_map(|v| v.to_string()),
                "[a-z0-9 ./:_-]{0,30}".prop_map(|v| format!("{v:?}")),
                proptest::prelude::Just("true".to_owned()),
                proptest::prelude::Just("[1, \"a\"]".to_owned()),
                proptest::prelude::Just("{ x = 1 }".to_owned()),
            ],
            kind in proptest::sample::select(vec!["", "kind = \"mqtt\"\n", "kind = \"webhook\"\n", "kind = \"nope\"\n"]),
            junk in ".{0,40}",
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("gw.toml");
            for text in [format!("[{section}]\n{kind}{key} = {value}\n"), junk.clone()] {
                std::fs::write(&path, &text).expect("write");
                if let Err(e) = load(&LoadOptions {
                    file: Some(path.clone()),
                    env: false,
                    built_kinds: vec!["mqtt"],
                }) {
                    let shown = e.to_string();
                    proptest::prop_assert!(!shown.is_empty());
                }
            }
        }
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_named_but_never_echoed() {
        Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[api]\ntoken = 314159265358979\n")?;
            let err = load(&opts("gw.toml")).expect_err("a number is not a token");
            let text = format!("{err}");
            assert!(text.contains("api.token"), "{text}");
            assert!(text.contains("a whole number"), "{text}");
            assert!(!text.contains("314159265358979"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn embedded_default_is_valid_and_has_a_broker_provider_rule_and_stdout_sink() {
        let c = load(&LoadOptions {
            file: None,
            env: false,
            built_kinds: vec!["mqtt"],
        })
        .expect("valid");
        assert!(c.embedded_broker.enabled);
        assert!(c.providers.contains_key("local"));
        assert_eq!(c.routing.default.as_deref(), Some("local"));
        assert!(c.rules.contains_key("high_temperature"));
        assert!(c.sinks.contains_key("stdout"));
    }

    #[test]
    fn file_then_environment_override_in_that_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                r#"
                [api]
                listen = "127.0.0.1:9000"
                [providers.edge]
                kind = "mqtt"
                port = 1884
                [routing]
                default = "edge"
                "#,
            )?;
            jail.set_env("IOTGW_PROVIDERS__EDGE__PORT", "1999");
            let c = load(&opts("gw.toml")).expect("valid");
            assert_eq!(c.api.listen, "127.0.0.1:9000");
            match &c.providers["edge"] {
                crate::ProviderConfig::Mqtt(m) => assert_eq!(m.port, 1999),
                other => panic!("{other:?}"),
            }
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_at_once_with_path_and_fix() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                r#"
                [api]
                lisen = "127.0.0.1:9000"
                [pipeline]
                debounce_window_secs = "soon"
                [providers.edge]
                kind = "mqtt"
                hots = "broker"
                [routing]
                default = "nowhere"
                "#,
            )?;
            let err = load(&opts("gw.toml")).expect_err("bad");
            let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
            assert!(paths.contains(&"api.lisen"), "{err}");
            assert!(paths.contains(&"pipeline.debounce_window_secs"), "{err}");
            assert!(paths.contains(&"providers.edge.hots"), "{err}");
            assert!(paths.contains(&"routing.default"), "{err}");
            let typo = err
                .problems
                .iter()
                .find(|p| p.path == "api.lisen")
                .expect("typo");
            assert!(typo.fix.contains("did you mean `listen`"), "{typo}");
            Ok(())
        });
    }

    #[test]
    fn environment_typos_are_reported_with_their_source() {
        Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "")?;
            jail.set_env("IOTGW_API__LISTN", "0.0.0.0:1");
            let err = load(&opts("gw.toml")).expect_err("bad");
            let p = &err.problems[0];
            assert_eq!(p.path, "api.listn");
            assert!(
                p.source.as_deref().unwrap_or_default().contains("IOTGW_"),
                "{p}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_cloud_provider_not_built_in_is_refused_with_what_to_do() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "[providers.aws]\nkind = \"aws_iot_core\"\nregion = \"eu-west-1\"\n",
            )?;
            let err = load(&opts("gw.toml")).expect_err("bad");
            assert!(
                err.to_string().contains("not built in this binary"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn missing_file_says_so() {
        let err = load(&opts("/nonexistent/gw.toml")).expect_err("bad");
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn levenshtein_finds_typos() {
        assert_eq!(closest("lisen", &["listen", "token"]), Some("listen"));
        assert_eq!(closest("zzzzzz", &["listen", "token"]), None);
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    #[test]
    fn the_commented_example_config_loads_and_uses_every_section() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.example.toml");
        let c = load_file(&path, &["mqtt"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.routing.rules.len(), 1);
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.sinks.len(), 3);
        assert_eq!(c.routing.default.as_deref(), Some("plant"));
    }
}
