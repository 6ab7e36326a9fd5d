//! Which partitions this replica reads, and their receivers: every balancing interval the
//! consumer lists the claims in its [`PartitionOwnership`], renews its own, claims what
//! [`balance::plan`] says (free partitions up to its fair share, or one stolen from the
//! busiest replica), starts a receiver for each partition it holds and stops the receiver
//! of each partition it lost (the receiver saves what settled; the new owner resumes from
//! the last checkpoint, so nothing is lost, at worst delivered twice and deduplicated by
//! the store).
//!
//! A replica that cannot renew (its store does not answer) stops reading a partition when
//! its own claim expires, which is when the others may take it over. On shutdown the
//! receivers stop first, then the claims are released (expired at once) so the others take
//! the partitions in their next round instead of after the expiry; a replica that dies
//! without releasing loses its partitions when its claims expire.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

use super::balance;
use super::event_hubs::{Consumer, EventSource, PartitionClaim};
use crate::{EventSender, ProviderError, Shutdown};

/// The receivers this consumer runs, one task per partition.
#[derive(Default)]
struct Receivers {
    tasks: JoinSet<Result<(), ProviderError>>,
    /// The partition of each task.
    ids: HashMap<Id, String>,
    /// Partitions read now, with their own stop.
    running: HashMap<String, Shutdown>,
    /// Partitions told to stop whose task has not ended yet (not restarted meanwhile: one
    /// reader per partition in this process).
    stopping: HashSet<String>,
}

impl Consumer {
    /// Reads the partitions this replica owns until `shutdown`, balancing them with the
    /// other replicas of the same ownership store.
    pub async fn run(
        self: Arc<Self>,
        source: Arc<dyn EventSource>,
        events: EventSender,
        shutdown: Shutdown,
    ) -> Result<(), ProviderError> {
        let Some(partitions) = self.partition_ids(source.as_ref(), &shutdown).await? else {
            return Ok(());
        };
        // Claims are keyed by checkpoint key: consumer groups never share claims.
        let keys: Vec<String> = partitions.iter().map(|p| self.key(p)).collect();
        let partition_of: HashMap<String, String> = keys
            .iter()
            .cloned()
            .zip(partitions.iter().cloned())
            .collect();
        let mut held: HashMap<String, PartitionClaim> = HashMap::new();
        let mut receivers = Receivers::default();
        let mut next_round = Instant::now();
        let outcome = loop {
            if Instant::now() >= next_round {
                self.balance(&keys, &mut held).await;
                next_round = Instant::now() + self.balance_interval;
            }
            let now = Utc::now();
            held.retain(|key, claim| {
                let live = !claim.expired(now);
                if !live {
                    tracing::warn!(provider = %self.instance, partition = %partition_of[key], "the claim expired without a renewal (the store did not answer); the partition stops here and another replica may take it over");
                }
                live
            });
            let wanted: HashSet<&String> = held.keys().map(|k| &partition_of[k]).collect();
            let lost: Vec<String> = receivers
                .running
                .keys()
                .filter(|p| !wanted.contains(p))
                .cloned()
                .collect();
            for p in lost {
                if let Some(stop) = receivers.running.remove(&p) {
                    stop.cancel();
                    receivers.stopping.insert(p);
                }
            }
            for p in wanted {
                if !receivers.running.contains_key(p) && !receivers.stopping.contains(p) {
                    let stop = shutdown.child_token();
                    let (me, source, events, partition) =
                        (self.clone(), source.clone(), events.clone(), p.clone());
                    let own_stop = stop.clone();
                    let task = receivers.tasks.spawn(async move {
                        me.partition(source, &partition, events, own_stop).await
                    });
                    receivers.ids.insert(task.id(), p.clone());
                    receivers.running.insert(p.clone(), stop);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                () = tokio::time::sleep_until(next_round) => {}
                Some(ended) = receivers.tasks.join_next_with_id() => {
                    let (id, result) = match ended {
                        Ok((id, r)) => (id, r),
                        Err(e) => (e.id(), Ok(())), // a panic: started again below if held
                    };
                    if let Some(p) = receivers.ids.remove(&id) {
                        receivers.stopping.remove(&p);
                        receivers.running.remove(&p);
                    }
                    if let Err(e) = result {
                        shutdown.cancel();
                        break Err(e);
                    }
                }
            }
        };
        // Every receiver stops with the shutdown (child stops) and saves what settled.
        while receivers.tasks.join_next().await.is_some() {}
        self.release(held).await;
        outcome
    }

    /// The partition ids; the endpoint may not answer yet: asked again until it does (or
    /// refuses the key). `None`: shut down meanwhile.
    async fn partition_ids(
        &self,
        source: &dyn EventSource,
        shutdown: &Shutdown,
    ) -> Result<Option<Vec<String>>, ProviderError> {
        loop {
            match source.partitions().await {
                Ok(p) => return Ok(Some(p)),
                Err(e @ ProviderError::Unauthorized { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(provider = %self.instance, error = %e, "reading the partitions failed; retrying");
                    self.pause(shutdown).await;
                    if shutdown.is_cancelled() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// One balancing round: lists the claims, renews this replica's, claims what the plan
    /// says; `held` becomes the claims this replica holds after it. A store that does not
    /// answer leaves `held` as it was (the claims run out at their expiry).
    async fn balance(&self, keys: &[String], held: &mut HashMap<String, PartitionClaim>) {
        let claims = match self.ownership.list().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(provider = %self.instance, error = %e, "listing the partition claims failed; trying again next round");
                return;
            }
        };
        let now = Utc::now();
        let plan = balance::plan(keys, &claims, &self.owner, now);
        let until =
            now + chrono::Duration::from_std(self.claim_expiry).unwrap_or(chrono::Duration::MAX);
        let mut next = HashMap::new();
        for c in plan.renew {
            match self
                .ownership
                .claim(&c.partition, &self.owner, Some(c.version), until)
                .await
            {
                Ok(Some(renewed)) => {
                    next.insert(renewed.partition.clone(), renewed);
                }
                Ok(None) => {
                    tracing::info!(provider = %self.instance, partition = %c.partition, "another replica claimed the partition between listing and renewing; stopping it here");
                }
                Err(e) => {
                    tracing::warn!(provider = %self.instance, partition = %c.partition, error = %e, "renewing the claim failed; it holds until it expires");
                    next.insert(c.partition.clone(), c);
                }
            }
        }
        for a in plan.acquire {
            match self
                .ownership
                .claim(&a.partition, &self.owner, a.expected_version, until)
                .await
            {
                Ok(Some(claimed)) => {
                    tracing::info!(provider = %self.instance, partition = %a.partition, from = ?a.from, "partition claimed");
                    next.insert(claimed.partition.clone(), claimed);
                }
                Ok(None) => {
                    tracing::debug!(provider = %self.instance, partition = %a.partition, "another replica claimed the partition first");
                }
                Err(e) => {
                    tracing::warn!(provider = %self.instance, partition = %a.partition, error = %e, "claiming the partition failed; trying again next round");
                }
            }
        }
        for lost in held.keys().filter(|k| !next.contains_key(*k)) {
            tracing::info!(provider = %self.instance, partition = %lost, "partition lost to another replica; its receiver stops");
        }
        *held = next;
    }

    /// Releases `held` (expired from now on) so other replicas take the partitions in
    /// their next round; a release that fails leaves the claim to expire.
    async fn release(&self, held: HashMap<String, PartitionClaim>) {
        let now = Utc::now();
        for c in held.into_values() {
            if let Err(e) = self
                .ownership
                .claim(&c.partition, &self.owner, Some(c.version), now)
                .await
            {
                tracing::debug!(provider = %self.instance, partition = %c.partition, error = %e, "releasing the claim failed; it expires on its own");
            }
        }
    }
}
