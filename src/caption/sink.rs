//! Where finished slices go: counters for the summary, the progress bar,
//! and a writer thread that appends records to the store in batches (so
//! workers never wait on the file lock) and can be asked to flush.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::Result;

use super::store::{CaptionRecord, Status, Store, Usage};
use super::SliceFailure;

/// Failures listed by name in the report (the counts are always complete).
const LISTED_FAILURES: usize = 100;

/// Per-run counters, shared by the workers.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) captioned: usize,
    pub(super) dropped: usize,
    pub(super) failed: usize,
    pub(super) skipped: usize,
    pub(super) retried: usize,
    pub(super) requests: u64,
    pub(super) asked_again: usize,
    pub(super) failures: Vec<SliceFailure>,
    pub(super) usage: Usage,
}

impl Tally {
    fn add(&mut self, r: &CaptionRecord) {
        match r.status {
            Status::Ok => self.captioned += 1,
            Status::Dropped => self.dropped += 1,
            Status::Failed => {
                self.failed += 1;
                if self.failures.len() < LISTED_FAILURES {
                    self.failures.push(SliceFailure {
                        slice_id: r.slice_id.clone(),
                        error: r.error.clone().unwrap_or_default(),
                    });
                }
            }
        }
        if r.attempts > 1 {
            self.retried += 1;
        }
        self.requests += r.attempts as u64;
        if let Some(u) = r.usage {
            self.usage += u;
        }
    }
}

/// What every worker shares: the record sink, counters and progress bar.
pub(super) struct Sink {
    pub(super) tx: Mutex<Option<mpsc::Sender<Msg>>>,
    pub(super) tally: Mutex<Tally>,
    pub(super) bar: indicatif::ProgressBar,
    /// Set when nothing more should be sent (fatal server reply, write error).
    pub(super) stop: AtomicBool,
    pub(super) stopped: Mutex<Option<String>>,
}

impl Sink {
    pub(super) fn record(&self, r: CaptionRecord) {
        let msg = {
            let Ok(mut t) = self.tally.lock() else { return };
            t.add(&r);
            format!("ok {} failed {} retried {}", t.captioned, t.failed, t.retried)
        };
        self.send(Msg::Record(Box::new(r)));
        self.bar.set_message(msg);
        self.bar.inc(1);
    }

    /// A record from the round that asks again for repeated captions: only
    /// a usable answer replaces the caption the slice already has.
    pub(super) fn record_again(&self, r: CaptionRecord) {
        if let Ok(mut t) = self.tally.lock() {
            t.asked_again += 1;
            t.requests += r.attempts as u64;
            if let Some(u) = r.usage {
                t.usage += u;
            }
        }
        if r.status != Status::Failed {
            self.send(Msg::Record(Box::new(r)));
        }
        self.bar.inc(1);
    }

    fn send(&self, m: Msg) {
        let sent = self
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|tx| tx.send(m).is_ok()))
            .unwrap_or(false);
        if !sent {
            self.halt("the caption writer stopped (see the error above)".into());
        }
    }

    /// Returns once every record sent so far is in the file.
    pub(super) fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Flush(tx));
        let _ = rx.recv();
    }

    pub(super) fn skip(&self) {
        if let Ok(mut t) = self.tally.lock() {
            t.skipped += 1;
        }
        self.bar.inc(1);
    }

    pub(super) fn halt(&self, why: String) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            if let Ok(mut s) = self.stopped.lock() {
                *s = Some(why);
            }
        }
    }
}

pub(super) enum Msg {
    Record(Box<CaptionRecord>),
    /// Answered once everything sent before it is in the file.
    Flush(mpsc::Sender<()>),
}

/// Appends records in batches on its own thread, so workers never wait on
/// the file lock.
pub(super) fn spawn_writer(store: Arc<Store>) -> (mpsc::Sender<Msg>, std::thread::JoinHandle<Result<()>>) {
    let (tx, rx) = mpsc::channel::<Msg>();
    let h = std::thread::spawn(move || -> Result<()> {
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            let mut acks = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Record(r) => batch.push(*r),
                    Msg::Flush(a) => acks.push(a),
                }
                if batch.len() < 4096 {
                    next = rx.try_recv().ok();
                }
            }
            store.append(&batch)?;
            for a in acks {
                let _ = a.send(());
            }
        }
        Ok(())
    });
    (tx, h)
}
