//! Connection-sequence ordering, which both event paths use (the Event Grid webhook and
//! the Event Hubs-compatible endpoint): a device's connection state is applied only when
//! its `sequenceNumber` is newer than the last one committed, so a late event never
//! overrides a newer one. Pure; imports nothing of the provider.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The newest committed connection-state sequence number per device, with the event time
/// emitted for it (shared by the Event Grid and Event Hubs paths).
pub type ConnectionSeqs = HashMap<String, (String, DateTime<Utc>)>;

/// [`ConnectionSeqs`] shared between tasks.
pub type SharedConnectionSeqs = Arc<std::sync::Mutex<ConnectionSeqs>>;

/// Compares two `sequenceNumber`s (hexadecimal strings): numerically, whatever their
/// lengths and case.
pub fn compare_sequence(a: &str, b: &str) -> Ordering {
    let norm = |s: &str| s.trim().trim_start_matches('0').to_ascii_uppercase();
    let (a, b) = (norm(a), norm(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compare_numerically_whatever_their_length_and_case() {
        assert_eq!(compare_sequence("0002", "1"), Ordering::Greater);
        assert_eq!(compare_sequence("00ff", "FE"), Ordering::Greater);
        assert_eq!(compare_sequence("000A", "a"), Ordering::Equal);
        assert_eq!(compare_sequence("0100", "FF"), Ordering::Greater);
    }
}
