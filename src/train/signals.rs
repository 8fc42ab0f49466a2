//! SIGTERM / SIGINT during pretraining: a flag the loop checks after each
//! step (checkpoint, then stop), and which signal came, for the exit status.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;

/// Signal flag (and which signal came), unregistered on drop.
pub struct Signals {
    flag: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    pub fn new(enabled: bool) -> Result<Signals> {
        let flag = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        let mut ids = Vec::new();
        if enabled {
            use signal_hook::consts::{SIGINT, SIGTERM};
            // Registered first, so it sees the flag before this signal sets it:
            // a second Ctrl-C exits at once.
            ids.push(signal_hook::flag::register_conditional_shutdown(
                SIGINT,
                130,
                flag.clone(),
            )?);
            ids.push(signal_hook::flag::register(SIGINT, flag.clone())?);
            ids.push(signal_hook::flag::register(SIGTERM, flag.clone())?);
            for sig in [SIGINT, SIGTERM] {
                ids.push(signal_hook::flag::register_usize(sig, which.clone(), sig as usize)?);
            }
        }
        Ok(Signals { flag, which, ids })
    }

    pub fn raised(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The signal that stopped the run (the last one received).
    pub fn signal(&self) -> Option<i32> {
        match self.which.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
