//! This machine's clock in milliseconds, its name, random numbers and ids: the one home of the
//! small helpers both services (and the tests) use. Leases and anything compared across agents use
//! the database's clock instead (`sql::now_ms_sql`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now, by this machine's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// This machine's name (`/etc/hostname`), or `fallback` if it has none.
pub fn hostname(fallback: &str) -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_owned())
}

/// A time in milliseconds since the epoch, as RFC 3339 (UTC, seconds).
pub fn format_ms(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A random number, different in every call and every process (std's randomly keyed hasher;
/// not for secrets).
pub fn random_u64() -> u64 {
    use std::{
        collections::hash_map::RandomState,
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// A random fraction in `[0, 1)`.
pub fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` scaled by a random factor in `[1 - spread, 1 + spread]`.
pub fn jitter(d: Duration, spread: f64) -> Duration {
    d.mul_f64(1.0 - spread + 2.0 * spread * random_fraction())
}

/// A random 128-bit id as 32 hex digits.
pub fn new_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_and_jitter_stays_in_bounds() {
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 32);
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000), 0.2);
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
    }
}
