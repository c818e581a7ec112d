//! A monitor that samples every job's checkpoint while a suite runs: a
//! `seq` or high-water mark that goes back is a regression (with when, and
//! how far), a new epoch not above every earlier one of the job is a
//! violation, and the samples give the suites their progress timeline.
//! Used by the reliability suite and the failover test.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::compare_versions;
use tidemark_state::Jobs;

use crate::Cluster;

/// A `seq` or high-water mark that went back, as the monitor saw it.
#[derive(Debug, Clone)]
pub struct Regression {
    pub at: Instant,
    pub job: String,
    pub routing_key: String,
    pub what: String,
    /// The most `seq` seen before, with the `records` counter then.
    pub from: (u64, u64),
    /// The `seq` (and `records`) seen now.
    pub to: (u64, u64),
}

#[derive(Default)]
pub struct Watch {
    pub samples: u64,
    /// (when, the sum of every job's seq).
    pub progress: Vec<(Instant, u64)>,
    /// (when, every job's seq).
    pub seqs: Vec<(Instant, BTreeMap<String, u64>)>,
    pub regressions: Vec<Regression>,
    /// An epoch first seen that is not above every epoch the job had
    /// (reused, or granted out of order).
    pub epoch_violations: Vec<String>,
    /// A job's epoch went back to one it had before (a failover lost a lease).
    pub epoch_steps_back: Vec<String>,
    /// The epochs every job had, in the order first seen.
    pub epochs: BTreeMap<String, Vec<u64>>,
}

pub struct Monitor {
    stop: Arc<AtomicBool>,
    watch: Arc<Mutex<Watch>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    pub async fn start(c: &Cluster) -> Monitor {
        let store = c.store().await;
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Arc::new(Mutex::new(Watch::default()));
        let (st, w) = (stop.clone(), watch.clone());
        let task = tokio::spawn(async move {
            // job -> (max seq, records at it, max high-water) so far, and
            // (seq, high-water) of the last sample: a step back from the
            // last sample is one regression, measured from the max.
            let mut seen: HashMap<String, (u64, u64, Option<String>)> = HashMap::new();
            let mut last: HashMap<String, (u64, Option<String>)> = HashMap::new();
            while !st.load(Ordering::SeqCst) {
                let listed = tokio::time::timeout(Duration::from_secs(5), store.list()).await;
                if let Ok(Ok(jobs)) = listed {
                    let at = Instant::now();
                    let mut w = w.lock().unwrap();
                    w.samples += 1;
                    let total: u64 = jobs.iter().map(|(_, cp)| cp.seq).sum();
                    w.progress.push((at, total));
                    let seqs = jobs.iter().map(|(j, cp)| (j.to_string(), cp.seq)).collect();
                    w.seqs.push((at, seqs));
                    for (job, cp) in jobs {
                        let k = job.to_string();
                        let rk = format!("{}.{}", job.feed, job.partition);
                        if let (Some((max_seq, records, max_hw)), Some((last_seq, last_hw))) =
                            (seen.get(&k), last.get(&k))
                        {
                            let hw_back = match (last_hw, &cp.high_water) {
                                (Some(old), Some(new)) => compare_versions(new, old).is_lt(),
                                _ => false,
                            };
                            if cp.seq < *last_seq || hw_back {
                                w.regressions.push(Regression {
                                    at,
                                    job: k.clone(),
                                    routing_key: rk.clone(),
                                    what: format!(
                                        "seq {max_seq} -> {}, high-water {} -> {}",
                                        cp.seq,
                                        max_hw.as_deref().unwrap_or("-"),
                                        cp.high_water.as_deref().unwrap_or("-")
                                    ),
                                    from: (*max_seq, *records),
                                    to: (cp.seq, cp.records),
                                });
                            }
                        }
                        last.insert(k.clone(), (cp.seq, cp.high_water.clone()));
                        // Epochs: a new one is above every one before.
                        let list = w.epochs.entry(k.clone()).or_default();
                        let max_epoch = list.iter().copied().max().unwrap_or(0);
                        if cp.epoch > 0 && !list.contains(&cp.epoch) {
                            list.push(cp.epoch);
                            if cp.epoch < max_epoch {
                                let msg = format!(
                                    "{k}: new epoch {} is below epoch {max_epoch} it had before",
                                    cp.epoch
                                );
                                w.epoch_violations.push(msg);
                            }
                        } else if cp.epoch > 0 && cp.epoch < max_epoch {
                            let msg =
                                format!("{k}: epoch {max_epoch} -> {} (seen before)", cp.epoch);
                            if w.epoch_steps_back.last() != Some(&msg) {
                                w.epoch_steps_back.push(msg);
                            }
                        }
                        let (mut seq, mut records, mut hw) =
                            seen.remove(&k).unwrap_or((cp.seq, cp.records, None));
                        if cp.seq >= seq {
                            seq = cp.seq;
                            records = cp.records;
                        }
                        hw = match (hw, cp.high_water) {
                            (Some(a), Some(b)) => Some(if compare_versions(&a, &b).is_lt() {
                                b
                            } else {
                                a
                            }),
                            (a, b) => a.or(b),
                        };
                        seen.insert(k, (seq, records, hw));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Monitor { stop, watch, task }
    }

    /// The sum of every job's seq at the last sample.
    pub fn last_total(&self) -> Option<u64> {
        self.watch.lock().unwrap().progress.last().map(|p| p.1)
    }

    /// The first sample at or after `after` whose total is above `above`.
    pub fn first_progress(&self, after: Instant, above: u64) -> Option<Instant> {
        self.watch
            .lock()
            .unwrap()
            .progress
            .iter()
            .find(|(at, total)| *at >= after && *total > above)
            .map(|p| p.0)
    }

    pub async fn finish(self) -> Watch {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        Arc::try_unwrap(self.watch)
            .ok()
            .map(|m| m.into_inner().unwrap())
            .expect("the monitor's task is done")
    }
}
