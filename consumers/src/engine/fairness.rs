//! Operational fairness: a per-tenant pace (governor) that decides how long a
//! partition's next batch waits so one tenant's flood cannot starve the rest.
//!
//! Guarantee: timing only. A deferred batch is processed later, in order, in
//! full; nothing is dropped or reordered, and results never depend on pacing.
//! Idle tenants are evicted (`retain_recent`) so memory stays flat.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

pub struct Fairness {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Fairness {
    pub fn new(events_per_sec: u32) -> Self {
        let rate = NonZeroU32::new(events_per_sec).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate)),
        }
    }

    /// How long a batch whose messages carry these keys (tenant ids) must wait
    /// until every tenant in it is within its pace; None: process it now (and
    /// its events are charged to the tenants' pace).
    pub fn wait_for<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) -> Option<Duration> {
        let mut per_tenant: HashMap<&[u8], u32> = HashMap::new();
        for k in keys {
            *per_tenant.entry(k).or_default() += 1;
        }
        let mut wait: Option<Duration> = None;
        for (tenant, n) in per_tenant {
            let Some(n) = NonZeroU32::new(n) else {
                continue;
            };
            let key = String::from_utf8_lossy(tenant).into_owned();
            match self.limiter.check_key_n(&key, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let w = not_until.wait_time_from(DefaultClock::default().now());
                    wait = Some(wait.map_or(w, |x| x.max(w)));
                }
                // More than one second's pace in a single batch: let it through.
                Err(_) => {}
            }
        }
        wait
    }

    /// Forgets tenants that have been idle long enough to be back at full pace.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn tenants_tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tenant: &'static str, n: usize) -> Vec<&'static [u8]> {
        vec![tenant.as_bytes(); n]
    }

    #[test]
    fn a_flooding_tenant_waits_and_others_do_not() {
        let f = Fairness::new(100);
        assert_eq!(
            f.wait_for(keys("big", 100).into_iter()),
            None,
            "first second's pace fits"
        );
        let w = f
            .wait_for(keys("big", 50).into_iter())
            .expect("over pace: must wait");
        assert!(w > Duration::ZERO && w <= Duration::from_secs(1), "{w:?}");
        assert_eq!(
            f.wait_for(keys("small", 10).into_iter()),
            None,
            "another tenant is not held back"
        );
    }

    #[test]
    fn idle_tenants_are_evicted() {
        let f = Fairness::new(1_000_000);
        for i in 0..500 {
            let t = format!("t{i}");
            assert_eq!(f.wait_for(std::iter::once(t.as_bytes())), None);
        }
        assert_eq!(f.tenants_tracked(), 500);
        std::thread::sleep(Duration::from_millis(20));
        f.evict_idle();
        assert_eq!(f.tenants_tracked(), 0);
    }
}
