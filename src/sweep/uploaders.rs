//! The sweep's uploaders: `concurrency` workers on the upload pool, in the idle scheduling class, that
//! encode, store and verify captured flows and hand each result back to the coordinator. They end when
//! the sweep closes their channel, so none outlives its sweep.

use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use crate::archive::capture::Capture;
use crate::archive::{self, Uploaded};
use crate::ops::configs::{Settings, CONCURRENCY_MAX};
use crate::ops::errors::FlowError;
use crate::ops::log;
use crate::runtime::pool::{enter_idle_class, Pool};
use crate::s3::Store;
use crate::sweep::Stopped;
use crate::sync::lock;

/// The config's maximum bounds the threads; a sweep keeps at most `concurrency` flows in flight.
pub static UPLOAD_POOL: Pool = Pool::new(
    "flowarchive-upload",
    CONCURRENCY_MAX as usize,
    CONCURRENCY_MAX as usize,
);

/// One flow's upload result, by flow id.
pub type Done = (String, Result<Uploaded, FlowError>);

/// Starts the uploaders; send them captured flows on the returned channel, close it when done.
pub fn start(settings: &Arc<Settings>, done: Sender<Done>) -> Result<SyncSender<Capture>, Stopped> {
    let (job_tx, job_rx) = sync_channel::<Capture>(settings.concurrency);
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..settings.concurrency {
        let (job_rx, done, settings) = (job_rx.clone(), done.clone(), settings.clone());
        let s3 = Store::new(&settings.s3)?;
        let uploader = Box::new(move || {
            enter_idle_class();
            loop {
                // The lock is held only to take one flow, never during its upload.
                let next = lock(&job_rx).recv();
                let Ok(capture) = next else { break };
                let id = capture.flow.id.clone();
                let result =
                    log::contained("an upload", || archive::upload(capture, &settings, &s3))
                        .unwrap_or_else(|| {
                            Err(FlowError::Internal("upload worker panicked".into()))
                        });
                if done.send((id, result)).is_err() {
                    break;
                }
            }
        });
        if UPLOAD_POOL.submit(uploader).is_err() {
            return Err(Stopped::NoWorker);
        }
    }
    Ok(job_tx)
}
