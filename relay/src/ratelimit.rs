//! A token bucket that limits the bytes per second all upstream fetches of a
//! relay take together, so a branch on a thin link can be told how fast to
//! fill its cache. The bucket holds at most one second's worth.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

pub struct RateLimit {
    bytes_per_second: f64,
    /// Bytes that may still be taken now (negative: owed), and when that was computed.
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        Self {
            bytes_per_second: rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Accounts for `n` bytes, waiting as long as the rate asks.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut state = self.state.lock().expect("lock poisoned");
            let (available, at) = &mut *state;
            let now = Instant::now();
            *available = (*available
                + now.duration_since(*at).as_secs_f64() * self.bytes_per_second)
                .min(self.bytes_per_second);
            *at = now;
            *available -= n as f64;
            (*available < 0.0).then(|| Duration::from_secs_f64(-*available / self.bytes_per_second))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transfers_are_held_to_the_rate() {
        let limit = RateLimit::new(1_000_000);
        let start = Instant::now();
        // 1 MB of burst, then 1.5 MB more at 1 MB/s.
        for _ in 0..25 {
            limit.take(100_000).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(
            (1.4..3.0).contains(&secs),
            "2.5 MB at 1 MB/s with a 1 MB burst took {secs:.2}s"
        );
    }
}
