//! Just enough of the Prometheus text format to read tidemark's own
//! `/metrics`: sums of counters and histograms across label sets, and
//! quantiles read off histogram buckets the way `histogram_quantile` does.

/// One scraped `/metrics` page.
pub struct Scrape(String);

impl Scrape {
    pub fn new(text: String) -> Self {
        Scrape(text)
    }

    /// (labels, value) of every sample named exactly `name`.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let end = r.rfind('}')?;
                    (&r[..end], &r[end + 1..])
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
    }

    /// The sum of every sample named `name`, across all label sets.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).map(|(_, v)| v).sum()
    }

    /// Cumulative bucket counts of histogram `name`, summed across label sets.
    pub fn buckets(&self, name: &str) -> Buckets {
        let mut b = Buckets::default();
        for (labels, v) in self.samples(&format!("{name}_bucket")) {
            let Some(le) = label(labels, "le") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                }
            };
            b.add(le, v);
        }
        b
    }
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// A histogram's cumulative buckets: (upper bound, count), sorted by bound.
#[derive(Debug, Default, Clone)]
pub struct Buckets(Vec<(f64, f64)>);

impl Buckets {
    pub fn add(&mut self, le: f64, count: f64) {
        match self.0.iter_mut().find(|(b, _)| *b == le) {
            Some(slot) => slot.1 += count,
            None => {
                self.0.push((le, count));
                self.0.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// Merge another scrape's buckets into these.
    pub fn merge(&mut self, other: &Buckets) {
        for &(le, c) in &other.0 {
            self.add(le, c);
        }
    }

    pub fn count(&self) -> f64 {
        self.0.last().map(|b| b.1).unwrap_or(0.0)
    }

    /// What was observed since `earlier` (a scrape of the same histogram).
    pub fn minus(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(le, c)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(b, _)| *b == le)
                        .map_or(0.0, |x| x.1);
                    (le, (c - before).max(0.0))
                })
                .collect(),
        )
    }

    /// The q-quantile, interpolated linearly inside its bucket (Prometheus's
    /// `histogram_quantile`): exact only to the bucket bounds. A quantile in
    /// the `+Inf` bucket answers the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.0 {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cum - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            (lower, below) = (le, cum);
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tidemark_page_latency_seconds Time.
# TYPE tidemark_page_latency_seconds histogram
tidemark_page_latency_seconds_sum{feed="a"} 3.5
tidemark_page_latency_seconds_count{feed="a"} 10
tidemark_page_latency_seconds_bucket{le="0.1",feed="a"} 0
tidemark_page_latency_seconds_bucket{le="0.2",feed="a"} 8
tidemark_page_latency_seconds_bucket{le="+Inf",feed="a"} 10
tidemark_page_latency_seconds_bucket{le="0.1",feed="b"} 10
tidemark_page_latency_seconds_bucket{le="0.2",feed="b"} 10
tidemark_page_latency_seconds_bucket{le="+Inf",feed="b"} 10
tidemark_pages_fetched_total{feed="a"} 7
tidemark_pages_fetched_total{feed="b"} 5
tidemark_pages_fetched_total_x 100
tidemark_tasks_in_flight 3
"#;

    #[test]
    fn sums_counters_across_label_sets_and_only_the_exact_name() {
        let s = Scrape::new(TEXT.into());
        assert_eq!(s.sum("tidemark_pages_fetched_total"), 12.0);
        assert_eq!(s.sum("tidemark_tasks_in_flight"), 3.0);
        assert_eq!(s.sum("tidemark_missing"), 0.0);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_histogram_quantile() {
        let b = Scrape::new(TEXT.into()).buckets("tidemark_page_latency_seconds");
        assert_eq!(b.count(), 20.0);
        // 10 observations in (0, 0.1], 8 in (0.1, 0.2], 2 above 0.2.
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p70 = b.quantile(0.7).unwrap();
        assert!((p70 - 0.15).abs() < 1e-9, "{p70}");
        // The top 10% are in +Inf: the highest finite bound answers.
        assert_eq!(b.quantile(0.99), Some(0.2));
        assert_eq!(Buckets::default().quantile(0.5), None);
    }
}
