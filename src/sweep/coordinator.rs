//! The sweep's coordinator: one thread that selects candidates, begins them, hands their captures to
//! the uploaders and commits what returns, every step that touches the dataset handed to the event loop
//! (several flows per step within the step budget).
//!
//! Why a state machine: the coordinator is in one of three phases, and each round of work is one
//! function that says which phase comes next, instead of nested loops whose flags decide when to stop.
//! - `Selecting`: take the uploads that returned, commit them and begin as many candidates as uploaders
//!   are free (none while the module holds `buffer-max-bytes` for flows in flight), in one batched
//!   step (each step is a wake-up of the event loop and of this thread, so a round costs one); wait
//!   for an upload only when there was nothing to do. It ends when selection is exhausted, LIMIT is
//!   reached or the uploaders are gone.
//! - `Draining`: the job channel is closed, so the uploaders end once the flows out are done; commit
//!   each batch as it returns until the results channel closes (no uploader outlives its sweep).
//! - `Done`.
//!
//! A selection error (a node demoted mid-sweep) stops the sweep at once, as before: flows still at the
//! uploaders are not waited for and end `InFlight`. Every flow is a token moved by the ledger, so
//! however the coordinator ends (done, an error, a panic), the flows it held are ended or, if lost,
//! reported by the ledger's check.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, SyncSender};
use std::sync::Arc;

use redis_module::ContextFlags;

use crate::archive::capture::{self, Capture, Inspected, Start};
use crate::archive::eligible::Window;
use crate::archive::{self, Archived, Uploaded};
use crate::ops::configs::Settings;
use crate::ops::errors::{self, FlowError, ServerError};
use crate::ops::metrics::{self, Stage};
use crate::runtime::mainthread;
use crate::sweep::flow::{Flow, Outcome, State};
use crate::sweep::ledger::Ledger;
use crate::sweep::select::{Recent, Selector};
use crate::sweep::uploaders::{self, Done};
use crate::sweep::{Job, Stopped};

/// Where the coordinator is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Selecting,
    Draining,
    Done,
}

/// What one selecting round did, for `after_round` to decide the next phase.
#[derive(Clone, Copy, Debug)]
struct Round {
    /// Selection is exhausted, or LIMIT reached: nothing more will be begun.
    selection_over: bool,
    /// The uploaders took every capture handed to them (DRYRUN: always).
    uploaders_there: bool,
    began: bool,
    committed: bool,
    /// Flows at the uploaders now.
    uploading: usize,
}

/// What follows a selecting round: selecting again, waiting for an upload first, or draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Select,
    Wait,
    Drain,
}

fn after_round(r: Round) -> Next {
    if r.selection_over || !r.uploaders_there {
        Next::Drain
    } else if r.began || r.committed {
        Next::Select
    } else if r.uploading > 0 {
        // Every uploader is busy: nothing to do until one returns.
        Next::Wait
    } else {
        // Nothing begun with uploaders free, nothing out: selection has nothing more.
        Next::Drain
    }
}

/// One sweep in progress, on its coordinator thread.
pub(super) struct Coordinator<'a> {
    job: &'a Job,
    settings: &'a Arc<Settings>,
    ledger: &'a mut Ledger,
    window: Window,
    selector: Selector,
    /// Selected and not yet candidates (each becomes one when taken, if new to `seen`).
    queue: VecDeque<String>,
    /// Whether selection has more.
    selecting: bool,
    seen: Recent,
    /// Flows handed to the uploaders (DRYRUN: found eligible), for LIMIT.
    started: usize,
    /// The uploaders' job channel; `None` under DRYRUN, once they are gone, and while draining.
    uploads: Option<SyncSender<Capture>>,
    results: Receiver<Done>,
    /// Flows at the uploaders (at most `concurrency`: only these hold their event logs).
    uploading: Vec<Flow>,
    /// Flows whose upload returned, for the next commit step.
    returned: Vec<(Flow, Result<Uploaded, FlowError>)>,
    /// Longest selection (or DRYRUN inspection) step.
    select_us: u64,
}

impl<'a> Coordinator<'a> {
    /// A coordinator with its uploaders started (none under DRYRUN).
    pub fn new(
        job: &'a Job,
        settings: &'a Arc<Settings>,
        ledger: &'a mut Ledger,
    ) -> Result<Self, Stopped> {
        let window = Window::now(settings.retention_ms, false);
        let selector = Selector::new(
            &settings.layout,
            window,
            settings.read_max_bytes,
            job.caller.clone(),
        );
        let (done_tx, results) = channel::<Done>();
        // DRYRUN uploads nothing: its results channel closes at once.
        let uploads = if job.dry_run {
            drop(done_tx);
            None
        } else {
            Some(uploaders::start(settings, done_tx)?)
        };
        Ok(Coordinator {
            job,
            settings,
            ledger,
            window,
            selector,
            queue: VecDeque::new(),
            selecting: true,
            seen: Recent::new(),
            started: 0,
            uploads,
            results,
            uploading: Vec::new(),
            returned: Vec::new(),
            select_us: 0,
        })
    }

    /// Runs the phases to `Done`. Selects in bounded steps and archives (or, DRYRUN, inspects) each
    /// candidate once.
    pub fn run(mut self) -> Result<(), Stopped> {
        let mut phase = Phase::Selecting;
        while phase != Phase::Done {
            phase = match phase {
                Phase::Selecting => self.select_round()?,
                Phase::Draining => self.drain_round(),
                Phase::Done => Phase::Done,
            };
        }
        Ok(())
    }

    fn select_round(&mut self) -> Result<Phase, Stopped> {
        self.take_returned();
        let free = match mainthread::buffers_full() && !self.uploading.is_empty() {
            // The module holds `buffer-max-bytes` for flows in flight: begin more once some are done.
            true => 0,
            false => self
                .settings
                .concurrency
                .saturating_sub(self.uploading.len()),
        };
        let flows = self.next_candidates(free)?;
        let began = !flows.is_empty();
        let committed = !self.returned.is_empty();
        if self.job.dry_run {
            flows.into_iter().for_each(|flow| self.dry_run(flow));
        } else {
            self.commit_then_begin(flows);
        }
        let round = Round {
            selection_over: self.selection_over(),
            uploaders_there: self.job.dry_run || self.uploads.is_some(),
            began,
            committed,
            uploading: self.uploading.len(),
        };
        Ok(match after_round(round) {
            Next::Select => Phase::Selecting,
            Next::Wait if self.wait_for_upload() => Phase::Selecting,
            Next::Wait | Next::Drain => Phase::Draining,
        })
    }

    /// Commits what returned, then waits for the next upload; `Done` once the results channel closes.
    fn drain_round(&mut self) -> Phase {
        // Closing the job channel ends the uploaders once the flows out are done; the results channel
        // closes when the last of them has ended.
        self.uploads = None;
        self.commit_returned();
        if !self.wait_for_upload() {
            return Phase::Done;
        }
        self.take_returned();
        Phase::Draining
    }

    fn limit_reached(&self) -> bool {
        self.job.limit.is_some_and(|limit| self.started >= limit)
    }

    fn selection_over(&self) -> bool {
        self.limit_reached() || (!self.selecting && self.queue.is_empty())
    }

    /// Up to `n` new candidates to begin now, each once and within LIMIT, selecting (one step per
    /// batch) when none is queued. Empty when `n` is 0 or no candidate is left.
    fn next_candidates(&mut self, n: usize) -> Result<Vec<Flow>, Stopped> {
        let n = match self.job.limit {
            Some(limit) => n.min(limit.saturating_sub(self.started)),
            None => n,
        };
        let mut flows = Vec::new();
        while flows.len() < n {
            let Some(id) = self.queue.pop_front() else {
                // Select more only when there is nothing to begin yet.
                if !flows.is_empty() || !self.selecting {
                    break;
                }
                match self.select()? {
                    Some(batch) => self.queue.extend(batch),
                    None => self.selecting = false,
                }
                continue;
            };
            if self.seen.insert(&id) {
                flows.push(self.ledger.select(id));
            }
        }
        Ok(flows)
    }

    fn select(&mut self) -> Result<Option<Vec<String>>, Stopped> {
        let (layout, batch) = (&self.settings.layout, self.settings.batch_size);
        let selector = &mut self.selector;
        mainthread::step(self.job.db, Stage::Select, &mut self.select_us, |ctx| {
            // A node demoted mid-sweep captures and uploads nothing more (it could not commit).
            if ctx.get_flags().contains(ContextFlags::SLAVE) {
                return Err(ServerError::NotWritable(errors::NOT_PRIMARY).into());
            }
            Ok(selector.next(ctx, layout, batch)?)
        })
    }

    /// DRYRUN: the whole eligibility check, nothing watched or read beyond it.
    fn dry_run(&mut self, flow: Flow) {
        let (job, settings, window) = (self.job, self.settings, &self.window);
        let inspected = mainthread::step(job.db, Stage::Select, &mut self.select_us, |ctx| {
            capture::inspect(ctx, &job.caller, job.db, flow.id(), settings, window)
        });
        let outcome = match inspected {
            Ok(Inspected::Eligible { .. }) => {
                self.started += 1;
                Outcome::WouldArchive
            }
            Ok(Inspected::AlreadyArchived(_)) => Outcome::SkippedIneligible,
            Err(e) => Outcome::of(&e),
        };
        self.ledger.finish(flow, outcome);
    }

    /// Commits the flows whose upload returned and begins `flows`, in one main-thread step where the
    /// step budget allows (`archive::commit_then_begin`); hands each capture to the uploaders.
    fn commit_then_begin(&mut self, flows: Vec<Flow>) {
        let (committing, uploaded) = self.take_uploaded();
        if committing.is_empty() && flows.is_empty() {
            return;
        }
        let (job, settings, window) = (self.job, self.settings, &self.window);
        let ids: Vec<String> = flows.iter().map(|f| f.id().to_string()).collect();
        let round =
            archive::commit_then_begin(uploaded, &job.caller, job.db, &ids, settings, window);
        self.settle_commits(committing, round.committed);
        self.hand_begun(flows, round.begun);
    }

    /// Hands each begun flow's capture to the uploaders: complete captures first, then long event logs
    /// read in their own chunk steps.
    fn hand_begun(&mut self, flows: Vec<Flow>, began: Vec<Result<Start, FlowError>>) {
        let mut long = Vec::new();
        // Every id is answered in order; a flow left unanswered would stay without an outcome, and the
        // ledger's check would say so.
        for (mut flow, started) in flows.into_iter().zip(began) {
            match started {
                Ok(Start::Capture(capture)) => {
                    self.ledger.advance(&mut flow, State::Capturing);
                    if capture.complete() {
                        self.hand_over(flow, *capture);
                    } else {
                        long.push((flow, capture));
                    }
                }
                Ok(Start::AlreadyArchived(_)) => {
                    self.ledger.finish(flow, Outcome::SkippedIneligible)
                }
                Err(e) => self.not_archived(flow, &e),
            }
        }
        for (flow, mut capture) in long {
            match archive::finish_capture(&mut capture, self.settings) {
                Ok(()) => self.hand_over(flow, *capture),
                Err(e) => self.not_archived(flow, &e),
            }
        }
    }

    /// Hands a whole capture to the uploaders. If they are gone (they never leave while the
    /// coordinator holds their channels; this is a fault), the flow fails, counted, and the sweep
    /// drains.
    fn hand_over(&mut self, mut flow: Flow, capture: Capture) {
        let sent = match &self.uploads {
            Some(uploads) => uploads.send(capture).is_ok(),
            None => false,
        };
        if !sent {
            self.uploads = None;
            let gone = FlowError::Internal("the sweep's uploaders are gone".into());
            return self.not_archived(flow, &gone);
        }
        self.started += 1;
        self.ledger.advance(&mut flow, State::Uploading);
        self.uploading.push(flow);
    }

    /// Takes the uploads that returned, without waiting.
    fn take_returned(&mut self) {
        let results: Vec<Done> = self.results.try_iter().collect();
        results.into_iter().for_each(|done| self.receive(done));
    }

    /// Waits for one upload to return; `false` once the uploaders are all gone.
    fn wait_for_upload(&mut self) -> bool {
        match self.results.recv() {
            Ok(done) => {
                self.receive(done);
                true
            }
            Err(_) => false,
        }
    }

    /// An upload's result, matched to its flow at the uploaders.
    fn receive(&mut self, (id, result): Done) {
        let Some(i) = self.uploading.iter().position(|f| f.id() == id) else {
            self.ledger
                .anomaly(format!("an upload returned for {id:?}, which is not out"));
            return;
        };
        let mut flow = self.uploading.swap_remove(i);
        if result.is_ok() {
            self.ledger.advance(&mut flow, State::Committing);
        }
        self.returned.push((flow, result));
    }

    /// Commits the flows whose upload returned (several per main-thread step) and ends each.
    fn commit_returned(&mut self) {
        let (committing, uploaded) = self.take_uploaded();
        if !committing.is_empty() {
            let committed = archive::commit_many(uploaded, self.settings);
            self.settle_commits(committing, committed);
        }
    }

    /// Takes the returned flows: those whose upload failed end here; the others, with their uploads,
    /// go on to their commit.
    fn take_uploaded(&mut self) -> (Vec<Flow>, Vec<Uploaded>) {
        let mut committing = Vec::with_capacity(self.returned.len());
        let mut uploaded = Vec::with_capacity(self.returned.len());
        for (flow, result) in std::mem::take(&mut self.returned) {
            match result {
                Ok(up) => {
                    committing.push(flow);
                    uploaded.push(up);
                }
                Err(e) => self.not_archived(flow, &e),
            }
        }
        (committing, uploaded)
    }

    /// Ends each committing flow with its commit's outcome.
    fn settle_commits(
        &mut self,
        mut committing: Vec<Flow>,
        committed: Vec<(String, Result<Archived, FlowError>)>,
    ) {
        for (id, outcome) in committed {
            let Some(i) = committing.iter().position(|f| f.id() == id) else {
                let what = format!("a commit answered for {id:?}, which was not committing");
                self.ledger.anomaly(what);
                continue;
            };
            let flow = committing.swap_remove(i);
            match outcome {
                Ok(done) => self.ledger.archived(flow, &done),
                Err(e) => self.not_archived(flow, &e),
            }
        }
        for flow in committing {
            let what = format!("the commit step answered nothing for {:?}", flow.id());
            self.ledger.anomaly(what);
            let unanswered = FlowError::Internal("its commit step answered nothing".into());
            self.not_archived(flow, &unanswered);
        }
    }

    /// Logs and counts a flow that stays live.
    fn not_archived(&mut self, flow: Flow, e: &FlowError) {
        metrics::failed(flow.id(), e);
        self.ledger.finish(flow, Outcome::of(e));
    }
}

/// However the sweep ended, the flows still out (at the uploaders, or returned and not committed:
/// only a sweep stopped early has any) end `InFlight`.
impl Drop for Coordinator<'_> {
    fn drop(&mut self) {
        for flow in std::mem::take(&mut self.uploading) {
            self.ledger.finish(flow, Outcome::InFlight);
        }
        for (flow, _) in std::mem::take(&mut self.returned) {
            self.ledger.finish(flow, Outcome::InFlight);
        }
        self.ledger.progress().held_main_thread(self.select_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(selection_over: bool, uploaders_there: bool, began: bool, committed: bool) -> Round {
        Round {
            selection_over,
            uploaders_there,
            began,
            committed,
            uploading: 0,
        }
    }

    #[test]
    fn a_round_that_did_something_selects_again() {
        assert_eq!(after_round(round(false, true, true, false)), Next::Select);
        assert_eq!(after_round(round(false, true, false, true)), Next::Select);
    }

    #[test]
    fn busy_uploaders_are_waited_for() {
        let busy = Round {
            uploading: 4,
            ..round(false, true, false, false)
        };
        assert_eq!(after_round(busy), Next::Wait);
    }

    #[test]
    fn selection_over_or_uploaders_gone_drain() {
        for (began, committed, uploading) in [(true, true, 3), (false, false, 0), (true, false, 1)]
        {
            let over = Round {
                uploading,
                ..round(true, true, began, committed)
            };
            assert_eq!(after_round(over), Next::Drain);
            let gone = Round {
                uploading,
                ..round(false, false, began, committed)
            };
            assert_eq!(after_round(gone), Next::Drain);
        }
        // Nothing begun although uploaders are free, and nothing out: nothing is left to wait for.
        assert_eq!(after_round(round(false, true, false, false)), Next::Drain);
    }
}
