//! The sweep's ledger: the one code that moves a flow's token (`flow.rs`) and, with it, changes the
//! sweep's counts (`Progress::shift`), and the check at the end of every sweep that they add up.
//!
//! Why a second record beside the published counts: a counting bug (a transition that counts an
//! outcome twice, forgets to release `in_flight`, or a flow that falls out of the coordinator without
//! an outcome) leaves the published numbers plausible. The ledger therefore keeps its own tally of the
//! tokens it issued and of the outcomes it gave them, counted apart from the published counters, and
//! `check` compares the two and proves the summary's identity (`progress.rs`). The check runs in
//! release builds too, after every sweep however it ended; a violation is logged at warning and counted
//! in INFO (`sweep_count_errors`), never a panic: the flows themselves are safe either way (a count is
//! only a count), and a sweep must not fail because its bookkeeping did.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::archive::Archived;
use crate::sweep::flow::{legal, Flow, Outcome, State};
use crate::sweep::progress::{Counts, Progress};

/// At most this many violations are described; the rest are only counted.
const DESCRIBED: usize = 8;

/// The published side of a transition (`Progress::shift`; a test puts a broken one here).
type Shift = fn(&Progress, &str, Option<State>, State);

pub struct Ledger {
    progress: Arc<Progress>,
    shift: Shift,
    /// Tokens issued (candidates) and tokens not ended yet.
    issued: u64,
    open: u64,
    /// The outcomes given, counted here and not by `Progress`.
    ended: Tally,
    /// Illegal transitions and other anomalies seen during the sweep: how many, and the first few.
    anomalies: u64,
    described: Vec<String>,
}

/// Outcomes by kind, as the ledger gave them.
#[derive(Default)]
struct Tally {
    by_outcome: BTreeMap<Outcome, u64>,
}

impl Tally {
    fn get(&self, o: Outcome) -> u64 {
        self.by_outcome.get(&o).copied().unwrap_or(0)
    }

    /// The failures by kind, as `failed_by_reason` shows them.
    fn failed(&self) -> BTreeMap<&'static str, u64> {
        let failed = self.by_outcome.iter().filter_map(|(o, n)| match o {
            Outcome::Failed(kind) => Some((*kind, *n)),
            _ => None,
        });
        failed.collect()
    }
}

impl Ledger {
    pub fn new(progress: Arc<Progress>) -> Self {
        Ledger {
            progress,
            shift: Progress::shift,
            issued: 0,
            open: 0,
            ended: Tally::default(),
            anomalies: 0,
            described: Vec::new(),
        }
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// A new candidate: counted once, from now on a token that must reach one outcome.
    pub fn select(&mut self, id: String) -> Flow {
        self.issued += 1;
        self.open += 1;
        (self.shift)(&self.progress, &id, None, State::Selected);
        Flow {
            id,
            state: State::Selected,
        }
    }

    /// Moves `flow` to the next stage (`Capturing`, `Uploading`, `Committing`).
    pub fn advance(&mut self, flow: &mut Flow, to: State) {
        if let State::Done(outcome) = to {
            // An outcome ends the token: only `finish` may give one.
            self.anomaly(format!(
                "flow {:?} given {outcome:?} without being ended",
                flow.id
            ));
            return;
        }
        self.step(flow, to);
    }

    /// Ends `flow` with its one outcome (the token is consumed: it cannot be ended twice).
    pub fn finish(&mut self, mut flow: Flow, outcome: Outcome) {
        self.step(&mut flow, State::Done(outcome));
        self.open = self.open.saturating_sub(1);
        *self.ended.by_outcome.entry(outcome).or_default() += 1;
    }

    /// Ends `flow` archived, with its bytes.
    pub fn archived(&mut self, flow: Flow, done: &Archived) {
        self.finish(flow, Outcome::Archived);
        self.progress.add_archived(done);
    }

    /// Something that should not happen to a flow's bookkeeping (a result for a flow that is not out,
    /// a commit that answered nothing for one): reported by `check`.
    pub fn anomaly(&mut self, what: String) {
        self.anomalies += 1;
        if self.described.len() < DESCRIBED {
            self.described.push(what);
        }
    }

    fn step(&mut self, flow: &mut Flow, to: State) {
        let from = flow.state;
        if !legal(from, to) {
            // Counted as asked all the same, so the published counts stay as near the truth as they
            // can; the check reports the transition.
            self.anomaly(format!("flow {:?} moved {from:?} -> {to:?}", flow.id));
        }
        (self.shift)(&self.progress, &flow.id, Some(from), to);
        flow.state = to;
    }

    /// The end-of-sweep check, once the coordinator has ended every flow it still held (those still
    /// out as `InFlight`): every candidate has exactly one outcome, each published count equals the
    /// outcomes the ledger gave, and `candidates` equals the sum of the outcome counts. Empty when all
    /// holds; else what does not.
    pub fn check(&self) -> Vec<String> {
        let mut wrong = self.described.clone();
        if self.anomalies > self.described.len() as u64 {
            let more = self.anomalies - self.described.len() as u64;
            wrong.push(format!("{more} more anomalies"));
        }
        if self.open > 0 {
            wrong.push(format!(
                "{} of {} candidates have no outcome",
                self.open, self.issued
            ));
        }
        let counts = self.progress.counts();
        wrong.extend(self.against(&counts));
        if counts.candidates != counts.outcomes() {
            wrong.push(format!(
                "candidates={} but archived + skipped_changed + skipped_ineligible + \
                 skipped_noperm + failed + in_flight + flows = {}",
                counts.candidates,
                counts.outcomes()
            ));
        }
        wrong
    }

    /// Each published count against the ledger's own.
    fn against(&self, counts: &Counts) -> Vec<String> {
        let e = &self.ended;
        let mut wrong = Vec::new();
        if counts.candidates != self.issued {
            wrong.push(format!(
                "candidates={} but {} flows were selected",
                counts.candidates, self.issued
            ));
        }
        let pairs = [
            ("archived", counts.archived, e.get(Outcome::Archived)),
            (
                "skipped_changed",
                counts.skipped_changed,
                e.get(Outcome::SkippedChanged),
            ),
            (
                "skipped_ineligible",
                counts.skipped_ineligible,
                e.get(Outcome::SkippedIneligible),
            ),
            (
                "skipped_noperm",
                counts.skipped_noperm,
                e.get(Outcome::SkippedNoperm),
            ),
            ("in_flight", counts.in_flight, e.get(Outcome::InFlight)),
            ("flows", counts.would_archive, e.get(Outcome::WouldArchive)),
        ];
        let differ = pairs.into_iter().filter(|(_, shown, ended)| shown != ended);
        wrong.extend(
            differ.map(|(name, shown, ended)| format!("{name}={shown} but {ended} flows ended so")),
        );
        let failed = e.failed();
        if counts.failed != failed {
            wrong.push(format!(
                "failed_by_reason={:?} but the flows failed {:?}",
                counts.failed, failed
            ));
        }
        wrong
    }
}

#[cfg(test)]
mod tests;
