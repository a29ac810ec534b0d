//! Choosing a backend for a request, and the budget that bounds retries.
//!
//! Power of two choices on in-flight requests (the default) sends each request to the less
//! busy of two random usable nodes: a slow node accumulates in-flight requests and so gets
//! fewer new ones, with no shared state beyond the per-backend counters. Round robin is the
//! alternative. Nodes failing their health check or passively ejected are skipped; when a
//! route has no usable node at all, every node is tried anyway (fail open), because a check
//! can be wrong while the node still serves.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::Algorithm;
use crate::snapshot::{Backend, RoutePool};

/// A chosen backend, and whether it was chosen by failing open.
pub struct Choice<'a> {
    pub backend: &'a Arc<Backend>,
    pub fail_open: bool,
}

/// Picks a backend not in `exclude` (those already tried for this request).
pub fn choose<'a>(
    pool: &'a RoutePool,
    algorithm: Algorithm,
    exclude: &[Arc<Backend>],
    now: u64,
) -> Option<Choice<'a>> {
    let eligible = |b: &&Arc<Backend>| !exclude.iter().any(|e| Arc::ptr_eq(e, b));
    let usable = |b: &&Arc<Backend>| eligible(b) && b.is_usable(now);
    let count = pool.backends.iter().filter(usable).count();
    if count > 0 {
        let nth = |n: usize| pool.backends.iter().filter(usable).nth(n);
        return pick(algorithm, &pool.next, count, nth).map(|backend| Choice {
            backend,
            fail_open: false,
        });
    }
    let count = pool.backends.iter().filter(eligible).count();
    let nth = |n: usize| pool.backends.iter().filter(eligible).nth(n);
    pick(algorithm, &pool.next, count, nth).map(|backend| Choice {
        backend,
        fail_open: true,
    })
}

fn pick<'a>(
    algorithm: Algorithm,
    next: &AtomicUsize,
    count: usize,
    nth: impl Fn(usize) -> Option<&'a Arc<Backend>>,
) -> Option<&'a Arc<Backend>> {
    match (count, algorithm) {
        (0, _) => None,
        (1, _) => nth(0),
        (_, Algorithm::RoundRobin) => nth(next.fetch_add(1, Ordering::Relaxed) % count),
        (_, Algorithm::P2c) => {
            let first = fastrand::usize(..count);
            // A second, different index: shift by 1..count.
            let second = (first + 1 + fastrand::usize(..count - 1)) % count;
            let (a, b) = (nth(first)?, nth(second)?);
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

/// A token bucket for retries: each request deposits `percent`/100 of a token, each retry
/// takes one. A reserve lets a quiet proxy still retry; a failing cluster under load gets at
/// most `percent` extra attempts, not a storm.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    balance: AtomicI64,
    deposit: i64,
}

/// Tokens a proxy starts with and may save up to.
const RESERVE_TOKENS: i64 = 10;
const MILLI: i64 = 1000;

impl RetryBudget {
    pub fn new(percent: u32) -> Self {
        RetryBudget {
            balance: AtomicI64::new(RESERVE_TOKENS * MILLI),
            deposit: i64::from(percent) * MILLI / 100,
        }
    }

    /// Called once per request.
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let cap = RESERVE_TOKENS * MILLI;
        // Cheap saturating add: a rare overshoot past the cap is harmless.
        if self.balance.load(Ordering::Relaxed) < cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes a token for one retry, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= MILLI).then_some(b - MILLI)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{now_ms, Publisher};

    fn publisher(nodes: &[&str]) -> Publisher {
        let p = crate::snapshot::tests::publisher();
        p.publish_nodes(&nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        p
    }

    #[test]
    fn round_robin_visits_every_usable_node() {
        let p = publisher(&["a", "b", "c"]);
        let snap = p.current();
        let pool = snap.pool(0);
        pool.backends[1].set_healthy(false);
        let mut seen: Vec<String> = (0..4)
            .map(|_| {
                let c = choose(pool, Algorithm::RoundRobin, &[], now_ms()).unwrap();
                assert!(!c.fail_open);
                c.backend.node.to_string()
            })
            .collect();
        seen.sort();
        assert_eq!(seen, ["a", "a", "c", "c"]);
    }

    #[test]
    fn p2c_prefers_the_less_busy_node() {
        let p = publisher(&["a", "b"]);
        let snap = p.current();
        let pool = snap.pool(0);
        let _busy: Vec<_> = (0..5).map(|_| pool.backends[0].start_request()).collect();
        for _ in 0..50 {
            let c = choose(pool, Algorithm::P2c, &[], now_ms()).unwrap();
            assert_eq!(&*c.backend.node, "b");
        }
    }

    #[test]
    fn excluded_are_skipped_and_all_unusable_fails_open() {
        let p = publisher(&["a", "b"]);
        let snap = p.current();
        let pool = snap.pool(0);
        let tried = vec![pool.backends[0].clone()];
        for _ in 0..10 {
            let c = choose(pool, Algorithm::P2c, &tried, now_ms()).unwrap();
            assert_eq!(&*c.backend.node, "b");
        }
        pool.backends[0].set_healthy(false);
        pool.backends[1].record_failure();
        let c = choose(pool, Algorithm::P2c, &[], now_ms()).unwrap();
        assert!(c.fail_open);
        let both = vec![pool.backends[0].clone(), pool.backends[1].clone()];
        assert!(choose(pool, Algorithm::P2c, &both, now_ms()).is_none());
    }

    #[test]
    fn retry_budget_caps_retries() {
        let budget = RetryBudget::new(20);
        let mut allowed = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.try_withdraw() {
                allowed += 1;
            }
        }
        // The reserve (10) plus 20% of 100 requests, give or take the cap.
        assert!((20..=30).contains(&allowed), "{allowed}");
        let none = RetryBudget::new(0);
        let mut allowed = 0;
        for _ in 0..100 {
            none.deposit();
            allowed += usize::from(none.try_withdraw());
        }
        assert_eq!(allowed, 10);
    }
}
