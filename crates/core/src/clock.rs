//! The wall clock every role reads, in unix milliseconds: the one unit that
//! checkpoints, leases, due times and page tasks are stamped in.

/// Now, unix milliseconds (0 if the system clock is set before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_in_milliseconds_since_the_epoch() {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ms = now_ms();
        assert!(
            secs > 1_577_836_800,
            "the test machine's clock is before 2020"
        );
        assert!(ms.abs_diff(secs * 1000) < 5_000, "{ms} ms vs {secs} s");
    }
}
