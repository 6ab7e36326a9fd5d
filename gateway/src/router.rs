//! Which provider instance hosts a new device: the instance named in the request, else the
//! first routing rule that matches (category, tag, id glob), else the default. A rule with
//! `fallback` instances sends the device to the first of them that is not down while its
//! own instance is down (down: unhealthy longer than `health.failover_after_secs`, which
//! the caller judges).

use std::collections::BTreeMap;

use iotgw_config::{RouteRule, RoutingConfig};
use iotgw_registry::DeviceId;

/// What the router looks at.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The device id.
    pub device_id: &'a DeviceId,
    /// Its category.
    pub category: Option<&'a str>,
    /// Its tags.
    pub tags: &'a BTreeMap<String, String>,
}

/// The compiled routing table.
#[derive(Debug, Clone)]
pub struct Router {
    rules: Vec<RouteRule>,
    default: Option<String>,
}

impl Router {
    /// From the (validated) config.
    pub fn new(cfg: &RoutingConfig) -> Self {
        Self {
            rules: cfg.rules.clone(),
            default: cfg.default.clone(),
        }
    }

    /// The instance for a device, or None when nothing matches and there is no default.
    /// `down` says which instances are down: a matching rule's instance that is down gives
    /// way to its first fallback that is not; when every one is down, the rule's own
    /// instance is the answer (the registration then fails or waits there, as it would
    /// without fallbacks).
    pub fn route(&self, input: RouteInput<'_>, down: impl Fn(&str) -> bool) -> Option<Route<'_>> {
        let Some(rule) = self.rules.iter().find(|r| matches(r, input)) else {
            return self.default.as_deref().map(|instance| Route {
                instance,
                instead_of: None,
            });
        };
        let own = rule.provider.as_str();
        if !down(own) {
            return Some(Route {
                instance: own,
                instead_of: None,
            });
        }
        Some(rule.fallback.iter().find(|f| !down(f)).map_or(
            Route {
                instance: own,
                instead_of: None,
            },
            |f| Route {
                instance: f,
                instead_of: Some(own),
            },
        ))
    }
}

/// Where a new device goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// The instance.
    pub instance: &'a str,
    /// The rule's own instance, when it was down and this is its fallback.
    pub instead_of: Option<&'a str>,
}

fn matches(rule: &RouteRule, input: RouteInput<'_>) -> bool {
    if let Some(cat) = &rule.category {
        if input.category != Some(cat.as_str()) {
            return false;
        }
    }
    if let Some(tag) = &rule.tag {
        let ok = match tag.split_once('=') {
            Some((k, v)) => input.tags.get(k).is_some_and(|have| have == v),
            None => input.tags.contains_key(tag.as_str()),
        };
        if !ok {
            return false;
        }
    }
    if let Some(pat) = &rule.id_pattern {
        if !glob(pat.as_bytes(), input.device_id.as_str().as_bytes()) {
            return false;
        }
    }
    true
}

/// `*` matches any run, `?` one character.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        provider: &str,
        category: Option<&str>,
        tag: Option<&str>,
        id: Option<&str>,
    ) -> RouteRule {
        RouteRule {
            provider: provider.into(),
            category: category.map(Into::into),
            tag: tag.map(Into::into),
            id_pattern: id.map(Into::into),
            fallback: Vec::new(),
        }
    }

    fn to(instance: &str) -> Option<Route<'_>> {
        Some(Route {
            instance,
            instead_of: None,
        })
    }

    #[test]
    fn a_rule_whose_instance_is_down_sends_new_devices_to_its_first_fallback_that_is_up() {
        let mut chillers = rule("aws", Some("chiller"), None, None);
        chillers.fallback = vec!["gcp".into(), "mqtt".into()];
        let r = Router::new(&RoutingConfig {
            default: Some("local".into()),
            rules: vec![chillers],
        });
        let d = DeviceId::parse("c-1").expect("id");
        let tags = BTreeMap::new();
        let input = RouteInput {
            device_id: &d,
            category: Some("chiller"),
            tags: &tags,
        };
        assert_eq!(r.route(input, |_| false), to("aws"));
        assert_eq!(
            r.route(input, |i| i == "aws"),
            Some(Route {
                instance: "gcp",
                instead_of: Some("aws")
            })
        );
        assert_eq!(
            r.route(input, |i| i != "mqtt"),
            Some(Route {
                instance: "mqtt",
                instead_of: Some("aws")
            })
        );
        assert_eq!(
            r.route(input, |_| true),
            to("aws"),
            "with every instance down the rule's own is kept"
        );
        let other = RouteInput {
            category: None,
            ..input
        };
        assert_eq!(
            r.route(other, |_| true),
            to("local"),
            "the default has no fallback"
        );
    }

    #[test]
    fn first_matching_rule_wins_else_the_default() {
        let r = Router::new(&RoutingConfig {
            default: Some("local".into()),
            rules: vec![
                rule("aws", Some("chiller"), Some("region=eu"), None),
                rule("gcp", None, Some("gcp"), None),
                rule("azure", None, None, Some("az-*-?")),
            ],
        });
        let id = |s: &str| DeviceId::parse(s).expect("id");
        let mut tags = BTreeMap::new();
        let d = id("pump-1");
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &d,
                    category: Some("chiller"),
                    tags: &tags
                },
                |_| false
            )
            .map(|x| x.instance),
            Some("local")
        );
        tags.insert("region".to_string(), "eu".to_string());
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &d,
                    category: Some("chiller"),
                    tags: &tags
                },
                |_| false
            )
            .map(|x| x.instance),
            Some("aws")
        );
        tags.insert("gcp".to_string(), String::new());
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &d,
                    category: None,
                    tags: &tags
                },
                |_| false
            )
            .map(|x| x.instance),
            Some("gcp")
        );
        let az = id("az-pump-7");
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &az,
                    category: None,
                    tags: &BTreeMap::new()
                },
                |_| false
            )
            .map(|x| x.instance),
            Some("azure")
        );
        let no = id("az-pump-77");
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &no,
                    category: None,
                    tags: &BTreeMap::new()
                },
                |_| false
            )
            .map(|x| x.instance),
            Some("local")
        );
    }

    #[test]
    fn without_default_an_unmatched_device_has_no_route() {
        let r = Router::new(&RoutingConfig {
            default: None,
            rules: vec![],
        });
        let d = DeviceId::parse("x").expect("id");
        assert_eq!(
            r.route(
                RouteInput {
                    device_id: &d,
                    category: None,
                    tags: &BTreeMap::new()
                },
                |_| false
            )
            .map(|x| x.instance),
            None
        );
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob(b"*", b""));
        assert!(glob(b"a*c", b"abbbc"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"abbc"));
        assert!(glob(b"*-01", b"site:3-01"));
    }
}
