//! Which Event Hubs partitions this replica should hold: the decision of one load-balancing
//! round, pure, from the claims listed in the ownership store.
//!
//! After Microsoft's event processors (their load balancer over a checkpoint store), written
//! for iotgw:
//! - an owner is active while one of its claims has not expired; this replica counts as
//!   active too, so it asks for its share before it holds anything;
//! - the fair share is `partitions / active owners`, one more where they do not divide;
//! - partitions nobody holds (never claimed, expired or released) are claimed up to the
//!   fair share at once: after a replica dies, the survivors take all of its partitions in
//!   the first round after its claims expired, instead of one per round;
//! - below the minimum share with nothing free, one partition per round is taken from the
//!   busiest owner, and only when that owner keeps at least as many as this replica then
//!   holds: shares converge without two replicas trading a partition back and forth;
//! - replicas try free partitions in an order of their own (a hash of owner and
//!   partition), so replicas starting together mostly claim different ones instead of all
//!   racing for the first.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::PartitionClaim;

/// A partition to claim this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquire {
    /// The partition.
    pub partition: String,
    /// The claim's version as listed (`None`: never claimed).
    pub expected_version: Option<i64>,
    /// The active owner it is taken from (a steal), if any.
    pub from: Option<String>,
}

/// What one round does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// This replica's claims that hold: renewed this round.
    pub renew: Vec<PartitionClaim>,
    /// Partitions to claim.
    pub acquire: Vec<Acquire>,
}

/// The round of replica `me` over `partitions` given the listed `claims` at `now`. Claims
/// on partitions not in `partitions` are ignored.
pub fn plan(
    partitions: &[String],
    claims: &[PartitionClaim],
    me: &str,
    now: DateTime<Utc>,
) -> Plan {
    let listed: HashMap<&str, &PartitionClaim> = claims
        .iter()
        .filter(|c| partitions.contains(&c.partition))
        .map(|c| (c.partition.as_str(), c))
        .collect();
    // Active claims per owner (this replica always among the owners).
    let mut by_owner: BTreeMap<&str, Vec<&PartitionClaim>> = BTreeMap::from([(me, Vec::new())]);
    let mut free = Vec::new();
    for p in partitions {
        match listed.get(p.as_str()) {
            Some(c) if !c.expired(now) => by_owner.entry(c.owner.as_str()).or_default().push(c),
            Some(c) => free.push(Acquire {
                partition: p.clone(),
                expected_version: Some(c.version),
                from: None,
            }),
            None => free.push(Acquire {
                partition: p.clone(),
                expected_version: None,
                from: None,
            }),
        }
    }
    let mine: Vec<PartitionClaim> = by_owner[me].iter().map(|c| (*c).clone()).collect();
    let owners = by_owner.len();
    let minimum = partitions.len() / owners;
    let maximum = if partitions.len().is_multiple_of(owners) {
        minimum
    } else {
        minimum + 1
    };
    free.sort_by_key(|a| spread(me, &a.partition));
    let mut acquire: Vec<Acquire> = free
        .into_iter()
        .take(maximum.saturating_sub(mine.len()))
        .collect();
    let holding = mine.len() + acquire.len();
    if holding < minimum {
        let busiest = by_owner
            .iter()
            .filter(|entry| *entry.0 != me)
            .max_by_key(|entry| (entry.1.len(), std::cmp::Reverse(*entry.0)));
        if let Some((owner, held)) = busiest {
            if held.len() > holding + 1 {
                let victim = held
                    .iter()
                    .min_by_key(|c| spread(me, &c.partition))
                    .expect("an owner with claims");
                acquire.push(Acquire {
                    partition: victim.partition.clone(),
                    expected_version: Some(victim.version),
                    from: Some((*owner).to_owned()),
                });
            }
        }
    }
    Plan {
        renew: mine,
        acquire,
    }
}

/// This replica's own order of partitions (FNV-1a of owner and partition): stable for a
/// replica, different between replicas.
fn spread(me: &str, partition: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in me.bytes().chain([0]).chain(partition.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).single().expect("time")
    }

    fn partitions(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    /// A claim of `owner` on `partition`, expiring `secs` from [`now`] (negative: expired).
    fn claim(partition: &str, owner: &str, secs: i64) -> PartitionClaim {
        PartitionClaim {
            partition: partition.into(),
            owner: owner.into(),
            version: 7,
            expires_at: now() + chrono::Duration::seconds(secs),
        }
    }

    fn acquired(plan: &Plan) -> Vec<&str> {
        let mut p: Vec<&str> = plan.acquire.iter().map(|a| a.partition.as_str()).collect();
        p.sort_unstable();
        p
    }

    #[test]
    fn a_replica_alone_claims_every_partition_in_its_first_round() {
        let plan = plan(&partitions(4), &[], "a", now());
        assert_eq!(acquired(&plan), ["p0", "p1", "p2", "p3"]);
        assert!(plan.acquire.iter().all(|a| a.expected_version.is_none()));
        assert!(plan.renew.is_empty());
    }

    #[test]
    fn a_second_replica_claims_the_free_partitions_up_to_its_fair_share() {
        let claims = [claim("p0", "a", 20), claim("p1", "a", 20)];
        let plan = plan(&partitions(5), &claims, "b", now());
        // 5 partitions, 2 owners: 2 or 3 each; three are free, so b may take 3.
        assert_eq!(acquired(&plan), ["p2", "p3", "p4"]);
        let with_b = [claims[0].clone(), claims[1].clone(), claim("p2", "b", 20)];
        let plan_a = super::plan(&partitions(5), &with_b, "a", now());
        assert_eq!(plan_a.renew.len(), 2, "a renews what it holds");
        assert_eq!(
            plan_a.acquire.len(),
            1,
            "a holds 2 of 5 with two owners: one more is its share: {plan_a:?}"
        );
    }

    #[test]
    fn a_replica_at_its_fair_share_only_renews() {
        let claims = [
            claim("p0", "a", 20),
            claim("p1", "a", 20),
            claim("p2", "b", 20),
            claim("p3", "b", 20),
        ];
        let plan = plan(&partitions(4), &claims, "a", now());
        assert_eq!(plan.renew.len(), 2);
        assert!(plan.acquire.is_empty(), "{plan:?}");
    }

    #[test]
    fn the_expired_claims_of_a_dead_replica_are_taken_over_all_in_one_round() {
        let claims = [
            claim("p0", "a", 20),
            claim("p1", "a", 20),
            claim("p2", "dead", -1),
            claim("p3", "dead", 0),
        ];
        let plan = plan(&partitions(4), &claims, "a", now());
        // The dead replica is no active owner: a alone should hold all four.
        assert_eq!(acquired(&plan), ["p2", "p3"]);
        assert!(
            plan.acquire
                .iter()
                .all(|a| a.expected_version == Some(7) && a.from.is_none()),
            "taken over with the version read: {plan:?}"
        );
    }

    #[test]
    fn an_unexpired_claim_of_another_replica_is_not_taken_as_free() {
        let claims = [claim("p0", "b", 1)];
        let plan = plan(&partitions(2), &claims, "a", now());
        assert_eq!(acquired(&plan), ["p1"]);
    }

    #[test]
    fn a_replica_below_its_share_steals_one_partition_per_round_from_the_busiest_owner() {
        let claims = [
            claim("p0", "a", 20),
            claim("p1", "a", 20),
            claim("p2", "a", 20),
            claim("p3", "a", 20),
            claim("p4", "b", 20),
            claim("p5", "c", 20),
        ];
        let plan = plan(&partitions(6), &claims, "c", now());
        assert_eq!(plan.acquire.len(), 1, "one steal per round: {plan:?}");
        let steal = &plan.acquire[0];
        assert_eq!(steal.from.as_deref(), Some("a"));
        assert_eq!(steal.expected_version, Some(7));
        assert!(["p0", "p1", "p2", "p3"].contains(&steal.partition.as_str()));
    }

    #[test]
    fn no_steal_when_it_would_only_move_the_imbalance() {
        // 7 partitions, 3 owners: 3/3/1 is unfair (c steals), 3/2/2 is fair (nobody does).
        let unfair = [
            claim("p0", "a", 20),
            claim("p1", "a", 20),
            claim("p2", "a", 20),
            claim("p3", "b", 20),
            claim("p4", "b", 20),
            claim("p5", "b", 20),
            claim("p6", "c", 20),
        ];
        assert_eq!(plan(&partitions(7), &unfair, "c", now()).acquire.len(), 1);
        let fair = [
            claim("p0", "a", 20),
            claim("p1", "a", 20),
            claim("p2", "a", 20),
            claim("p3", "b", 20),
            claim("p4", "b", 20),
            claim("p5", "c", 20),
            claim("p6", "c", 20),
        ];
        for me in ["a", "b", "c"] {
            assert!(
                plan(&partitions(7), &fair, me, now()).acquire.is_empty(),
                "{me} at a fair share"
            );
        }
        // 2 partitions, 3 owners: a replica holding none has a minimum of 0: no steal.
        let few = [claim("p0", "a", 20), claim("p1", "b", 20)];
        assert!(plan(&partitions(2), &few, "c", now()).acquire.is_empty());
    }

    #[test]
    fn claims_on_unknown_partitions_are_ignored() {
        let claims = [claim("other-group/p0", "b", 20), claim("p0", "b", 20)];
        let plan = plan(&partitions(2), &claims, "a", now());
        assert_eq!(acquired(&plan), ["p1"]);
    }

    #[test]
    fn replicas_try_free_partitions_in_different_orders() {
        let ps = partitions(16);
        let first = |me: &str| plan(&ps, &[], me, now()).acquire[0].partition.clone();
        let firsts: std::collections::BTreeSet<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|m| first(m))
            .collect();
        assert!(firsts.len() > 1, "every replica starts with {firsts:?}");
    }
}
