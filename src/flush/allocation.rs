//! The credit allocation of a batch: which of a user's current credit rows each charge
//! is taken from, and what the batch adds to each row's `used_credits`. Pure (no I/O):
//! [`write_batch`](super::write_batch) reads the rows under `FOR UPDATE`, calls
//! [`allocate`] before its INSERT (each usage row names its credit row) and
//! [`Allocation::increments`] after it (only the rows actually inserted move credits).
//!
//! The rule: a user's current rows are taken earliest-ending first (the order of
//! `billing_period_end`, `created_at`, `id`); a charge takes what a row has left and
//! goes on to the next; what no row has left stays on the last row, which may go below
//! zero (a charge settled in Redis is never refused here). Events are allocated in
//! batch order, each seeing what the ones before it took.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::usage::UsageEvent;

/// One of a user's current credit rows, as the allocation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditRow {
    pub id: Uuid,
    /// `total_credits − used_credits` (negative once overspent).
    pub remaining: i64,
}

/// Where a batch's charges go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Per event, in batch order: the credit row its usage row names — the first row
    /// it took from, else the user's first row; `None` for a user without current rows.
    pub credit_ids: Vec<Option<Uuid>>,
    /// Per event, in batch order: the rows it takes from and how much from each.
    pub parts: Vec<Vec<(Uuid, i64)>>,
}

/// Allocates each event's `credits_used` to its user's rows (`rows`: user → current
/// credit rows, earliest-ending first). A charge of zero or less takes nothing.
pub fn allocate(events: &[UsageEvent], rows: &HashMap<Uuid, Vec<CreditRow>>) -> Allocation {
    let mut left_in: HashMap<Uuid, Vec<CreditRow>> = rows.clone();
    let mut credit_ids = Vec::with_capacity(events.len());
    let mut parts = Vec::with_capacity(events.len());
    for e in events {
        let mut taken = Vec::new();
        let Some(rows) = left_in.get_mut(&e.user_id) else {
            credit_ids.push(None);
            parts.push(taken);
            continue;
        };
        let mut left = e.credits_used;
        let last = rows.len().saturating_sub(1);
        for (i, r) in rows.iter_mut().enumerate() {
            if left <= 0 {
                break;
            }
            let take = if i == last {
                left
            } else {
                left.min(r.remaining.max(0))
            };
            if take > 0 {
                r.remaining = r.remaining.saturating_sub(take);
                left -= take;
                taken.push((r.id, take));
            }
        }
        credit_ids.push(
            taken
                .first()
                .map(|t| t.0)
                .or_else(|| rows.first().map(|r| r.id)),
        );
        parts.push(taken);
    }
    Allocation { credit_ids, parts }
}

impl Allocation {
    /// What to add to each row's `used_credits` once `inserted` (the ids the INSERT
    /// returned) are known: each inserted row's parts, once even if the batch held its
    /// event twice (the first occurrence counts). Rows that move nothing are left out.
    pub fn increments(&self, events: &[UsageEvent], inserted: &[Uuid]) -> BTreeMap<Uuid, i64> {
        let mut uncounted: std::collections::HashSet<Uuid> = inserted.iter().copied().collect();
        let mut inc: BTreeMap<Uuid, i64> = BTreeMap::new();
        for (e, parts) in events.iter().zip(&self.parts) {
            if uncounted.remove(&e.id) {
                for (row, amount) in parts {
                    let v = inc.entry(*row).or_default();
                    *v = v.saturating_add(*amount);
                }
            }
        }
        inc
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn event(n: u128, user: Uuid, credits: i64) -> UsageEvent {
        UsageEvent {
            id: id(1_000_000 + n),
            created_at: Utc
                .timestamp_micros(1_764_000_000_000_000)
                .single()
                .unwrap(),
            user_id: user,
            model_id: "m".into(),
            operation: "chat",
            credits_used: credits,
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            duration_ms: 0,
            priced: None,
            metadata: None,
        }
    }

    fn rows(user: Uuid, remaining: &[(u128, i64)]) -> HashMap<Uuid, Vec<CreditRow>> {
        let list = remaining
            .iter()
            .map(|&(n, remaining)| CreditRow {
                id: id(n),
                remaining,
            })
            .collect();
        HashMap::from([(user, list)])
    }

    fn all_ids(events: &[UsageEvent]) -> Vec<Uuid> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn a_charge_takes_the_earliest_ending_row_first_and_spills_to_the_next() {
        let u = id(1);
        let rows = rows(u, &[(10, 5), (11, 100)]);
        let events = [event(1, u, 3), event(2, u, 4), event(3, u, 10)];
        let a = allocate(&events, &rows);
        assert_eq!(
            a.parts,
            vec![
                vec![(id(10), 3)],
                vec![(id(10), 2), (id(11), 2)],
                vec![(id(11), 10)]
            ]
        );
        assert_eq!(a.credit_ids, vec![Some(id(10)), Some(id(10)), Some(id(11))]);
        let inc = a.increments(&events, &all_ids(&events));
        assert_eq!(inc, BTreeMap::from([(id(10), 5), (id(11), 12)]));
    }

    #[test]
    fn what_no_row_has_left_stays_on_the_last_row() {
        let u = id(1);
        let rows = rows(u, &[(10, 2), (11, 1)]);
        let events = [event(1, u, 10)];
        let a = allocate(&events, &rows);
        assert_eq!(a.parts, vec![vec![(id(10), 2), (id(11), 8)]]);
        // An overspent row before the last is skipped; the last takes everything.
        let rows = self::rows(u, &[(10, -4), (11, 0)]);
        let a = allocate(&events, &rows);
        assert_eq!(a.parts, vec![vec![(id(11), 10)]]);
        assert_eq!(a.credit_ids, vec![Some(id(11))]);
    }

    #[test]
    fn a_free_request_names_the_first_row_and_a_user_without_rows_names_none() {
        let (u, stranger) = (id(1), id(2));
        let rows = rows(u, &[(10, 0), (11, 5)]);
        let events = [event(1, u, 0), event(2, stranger, 7), event(3, u, -3)];
        let a = allocate(&events, &rows);
        assert_eq!(a.credit_ids, vec![Some(id(10)), None, Some(id(10))]);
        assert!(a.parts.iter().all(Vec::is_empty));
        assert!(a.increments(&events, &all_ids(&events)).is_empty());
    }

    #[test]
    fn only_inserted_rows_move_credits_and_each_once() {
        let u = id(1);
        let rows = rows(u, &[(10, 100)]);
        let twice = event(1, u, 6);
        let events = [twice.clone(), event(2, u, 7), twice.clone(), event(3, u, 9)];
        let a = allocate(&events, &rows);
        // The replayed copy of an event is allocated too (it may push later events on),
        // but an inserted id moves credits once; an id not inserted moves none.
        let inc = a.increments(&events, &[twice.id, events[3].id]);
        assert_eq!(inc, BTreeMap::from([(id(10), 15)]));
        assert!(a.increments(&events, &[]).is_empty());
    }

    #[test]
    fn users_are_allocated_apart() {
        let (u, v) = (id(1), id(2));
        let mut rows = rows(u, &[(10, 3), (11, 3)]);
        rows.extend(self::rows(v, &[(20, 1), (21, 1)]));
        let events = [event(1, u, 4), event(2, v, 4)];
        let a = allocate(&events, &rows);
        assert_eq!(
            a.parts,
            vec![
                vec![(id(10), 3), (id(11), 1)],
                vec![(id(20), 1), (id(21), 3)]
            ]
        );
    }

    /// A batch of events of up to three users, each with up to three rows (user 3 has
    /// none), and a subset of them inserted.
    fn batch() -> impl Strategy<Value = (HashMap<Uuid, Vec<CreditRow>>, Vec<UsageEvent>, Vec<bool>)>
    {
        let rows = proptest::collection::vec(proptest::collection::vec(-50i64..200, 1..4), 2);
        let events = proptest::collection::vec((0u128..3, -5i64..300, 0u128..20), 0..24);
        (rows, events).prop_flat_map(|(rows, events)| {
            let mut map = HashMap::new();
            for (u, list) in rows.iter().enumerate() {
                let user = id(u as u128 + 1);
                let list = list
                    .iter()
                    .enumerate()
                    .map(|(i, &remaining)| CreditRow {
                        id: id(100 * (u as u128 + 1) + i as u128),
                        remaining,
                    })
                    .collect();
                map.insert(user, list);
            }
            // Ids repeat sometimes: a batch can hold an event twice.
            let events: Vec<UsageEvent> = events
                .into_iter()
                .map(|(u, credits, n)| event(n * 3 + u, id(u + 1), credits))
                .collect();
            let n = events.len();
            (
                Just(map),
                Just(events),
                proptest::collection::vec(any::<bool>(), n),
            )
        })
    }

    fn inserted(events: &[UsageEvent], keep: &[bool]) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = events
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(e, _)| e.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    proptest! {
        #[test]
        fn every_charge_is_allocated_whole_to_its_users_rows((rows, events, _) in batch()) {
            let a = allocate(&events, &rows);
            prop_assert_eq!(a.parts.len(), events.len());
            prop_assert_eq!(a.credit_ids.len(), events.len());
            for (i, e) in events.iter().enumerate() {
                let parts = &a.parts[i];
                match rows.get(&e.user_id) {
                    None => {
                        prop_assert!(parts.is_empty());
                        prop_assert_eq!(a.credit_ids[i], None);
                    }
                    Some(own) => {
                        let total: i64 = parts.iter().map(|p| p.1).sum();
                        prop_assert_eq!(total, e.credits_used.max(0));
                        prop_assert!(parts.iter().all(|p| p.1 > 0));
                        prop_assert!(parts.iter().all(|p| own.iter().any(|r| r.id == p.0)));
                        let first = parts.first().map(|p| p.0).or(own.first().map(|r| r.id));
                        prop_assert_eq!(a.credit_ids[i], first);
                    }
                }
            }
        }

        #[test]
        fn rows_are_used_up_in_order_and_only_the_last_goes_below_what_it_had(
            (rows, events, _) in batch(),
        ) {
            let a = allocate(&events, &rows);
            let mut taken: HashMap<Uuid, i64> = HashMap::new();
            for (row, amount) in a.parts.iter().flatten() {
                *taken.entry(*row).or_default() += amount;
            }
            for (user, own) in &rows {
                // What the batch charged the user, poured into the rows in order: each
                // row but the last gives at most what it had (nothing once overspent).
                let mut pour: i64 = events
                    .iter()
                    .filter(|e| e.user_id == *user)
                    .map(|e| e.credits_used.max(0))
                    .sum();
                for (i, r) in own.iter().enumerate() {
                    let gives = if i + 1 == own.len() { pour } else { pour.min(r.remaining.max(0)) };
                    pour -= gives;
                    prop_assert_eq!(taken.get(&r.id).copied().unwrap_or(0), gives, "row {:?}", r);
                }
            }
        }

        #[test]
        fn the_increments_are_the_inserted_charges_each_once((rows, events, keep) in batch()) {
            let a = allocate(&events, &rows);
            let ids = inserted(&events, &keep);
            let inc = a.increments(&events, &ids);
            let mut expected = 0i64;
            let mut seen = std::collections::HashSet::new();
            for e in &events {
                if ids.contains(&e.id) && seen.insert(e.id) && rows.contains_key(&e.user_id) {
                    expected += e.credits_used.max(0);
                }
            }
            prop_assert_eq!(inc.values().sum::<i64>(), expected);
            prop_assert!(inc.values().all(|v| *v > 0));
        }

        #[test]
        fn what_a_row_gives_does_not_depend_on_the_order_of_the_batch(
            (rows, events, _) in batch(),
            seed in any::<u64>(),
        ) {
            // Every event inserted (distinct ids, as a batch of new events has them).
            let mut events = events;
            let mut seen = std::collections::HashSet::new();
            events.retain(|e| seen.insert(e.id));
            let a = allocate(&events, &rows);
            let before = a.increments(&events, &all_ids(&events));
            let mut shuffled = events.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let b = allocate(&shuffled, &rows);
            prop_assert_eq!(before, b.increments(&shuffled, &all_ids(&shuffled)));
        }

        #[test]
        fn a_users_allocation_ignores_the_other_users_in_the_batch((rows, events, _) in batch()) {
            let a = allocate(&events, &rows);
            for user in (1..=3).map(id) {
                let own: Vec<UsageEvent> =
                    events.iter().filter(|e| e.user_id == user).cloned().collect();
                let alone = allocate(&own, &rows);
                let together: Vec<Vec<(Uuid, i64)>> = events
                    .iter()
                    .zip(&a.parts)
                    .filter(|(e, _)| e.user_id == user)
                    .map(|(_, p)| p.clone())
                    .collect();
                prop_assert_eq!(alone.parts, together);
            }
        }
    }
}
