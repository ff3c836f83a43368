//! When to try again and how long to wait first: exponential backoff with jitter, for the
//! failures another attempt can cure (a dropped connection, a restarting server), never for
//! a request the server refused.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Failed attempts in a row, without progress in between, before giving up.
    pub retries: u32,
    /// The first wait; each further failure doubles it, up to `max`.
    pub first: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// `retries` attempts, waiting 100 ms at first and at most 4 s: a restarting server is
    /// back within a few waits, and a dead one is reported within half a minute.
    pub fn new(retries: u32) -> Self {
        Self {
            retries,
            first: Duration::from_millis(100),
            max: Duration::from_secs(4),
        }
    }

    /// The wait before attempt `failure + 1`, between half and all of the exponential
    /// delay: `random` spreads many clients so that they do not reconnect in lockstep.
    pub fn delay(&self, failure: u32, random: u64) -> Duration {
        let exponential = self
            .first
            .saturating_mul(1 << failure.saturating_sub(1).min(30))
            .min(self.max);
        let half = exponential / 2;
        half + half.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Whether a failed RPC may succeed when tried again. Transport failures surface as
/// UNAVAILABLE, UNKNOWN, INTERNAL or CANCELLED depending on where the connection broke.
/// RESOURCE_EXHAUSTED is final when a BadRequest detail blames the request (too many bytes),
/// and transient when the server is only busy (all its stream slots taken). A connection
/// failure is transient unless it is a TLS mismatch or a refused certificate.
pub fn is_transient(status: &Status) -> bool {
    if let Some(unreachable) = super::source::unreachable(status) {
        return unreachable.is_transient();
    }
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded => true,
        Code::ResourceExhausted => status.get_details_bad_request().is_none(),
        _ => false,
    }
}

/// Counts failures and says how long to wait before the next attempt.
pub struct Backoff {
    policy: RetryPolicy,
    /// In a row, since the last progress.
    failures: u32,
    /// Retries granted in all.
    retried: u32,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            retried: 0,
        }
    }

    /// After a failure: the wait before trying again, or `None` when the retries are used
    /// up. An attempt that `progressed` starts a new count: a long download may survive any
    /// number of interruptions as long as each one is followed by progress.
    pub fn next(&mut self, progressed: bool) -> Option<Duration> {
        if progressed {
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures > self.policy.retries {
            return None;
        }
        self.retried += 1;
        Some(self.policy.delay(self.failures, random()))
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn retries(&self) -> u32 {
        self.policy.retries
    }

    /// Retries granted so far.
    pub fn retried(&self) -> u32 {
        self.retried
    }
}

/// A random number from the standard library's per-process random hash keys.
fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let policy = RetryPolicy::new(8);
        let ms = |failure, random| policy.delay(failure, random).as_millis();
        assert_eq!(ms(1, 0), 50);
        assert!((99..=100).contains(&ms(1, u64::MAX)));
        assert_eq!(ms(2, 0), 100);
        assert_eq!(ms(4, 0), 400);
        assert_eq!(ms(7, 0), 2000);
        assert_eq!(ms(40, 0), 2000);
        assert!(ms(40, u64::MAX) <= 4000);
    }

    #[test]
    fn progress_resets_the_count() {
        let mut backoff = Backoff::new(RetryPolicy::new(2));
        assert!(backoff.next(false).is_some());
        assert!(backoff.next(false).is_some());
        assert!(backoff.next(true).is_some());
        assert_eq!(backoff.failures(), 1);
        assert!(backoff.next(false).is_some());
        assert!(backoff.next(false).is_none());
        assert_eq!(backoff.retried(), 4);
    }

    #[test]
    fn refusals_are_final() {
        assert!(is_transient(&Status::unavailable("connection refused")));
        assert!(is_transient(&Status::unknown("error reading a body")));
        assert!(!is_transient(&Status::invalid_argument("bad shape")));
        assert!(is_transient(&Status::resource_exhausted(
            "all stream slots taken"
        )));
        let too_big = weightinit_engine::RequestError::over_limit("tensors", "too many bytes");
        assert!(!is_transient(&weightinit_proto::convert::status(too_big)));
    }
}
