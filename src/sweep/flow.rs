//! Where one flow is in its sweep, and the moves it may make.
//!
//! Why a state per flow: a sweep's summary is a set of counts (`candidates`, `archived`, the skips,
//! `failed`, `in_flight`), and a count kept by hand beside loops and flags can count a flow twice or
//! not at all without anything noticing. Here every flow the sweep selects is a `Flow` token with an
//! explicit state; it moves only along the edges of `legal`, and the token is consumed by its one final
//! outcome, so a second outcome cannot be written. The ledger (`ledger.rs`) moves the tokens and is the
//! only code that changes the counts; at the end of the sweep it proves that they add up.
//!
//! The walk of an archived flow: `Selected` (a candidate, counted once) → `Capturing` (begun: its keys
//! read, the flow claimed on the change watch; a long log read in steps of its own) → `Uploading` (at
//! the uploaders, counted in `in_flight`) → `Committing` (its upload returned, waiting for or in its
//! commit step) → `Done(Archived)`. Any stage before the commit may end the flow live instead (skipped
//! or failed by kind); DRYRUN ends an eligible candidate at once as `WouldArchive` (listed under `flows`);
//! a flow still at the uploaders or committing when the sweep ends is `InFlight`.

use crate::ops::errors::FlowError;

/// A flow's state within one sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A candidate: found by selection and new to the sweep's `Recent` window.
    Selected,
    /// Begun: its capture holds the flow's keys as read so far; the rest of a long log is read next.
    Capturing,
    /// Handed to the uploaders (encode, read back, store, verify).
    Uploading,
    /// Its object is stored and verified; the commit step proves it unchanged and removes it.
    Committing,
    /// Its one outcome in this sweep.
    Done(Outcome),
}

/// How a flow's part in a sweep ended: each is one summary count (`Failed` by kind in
/// `failed_by_reason`; `WouldArchive` in DRYRUN's `flows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Archived,
    /// A late write (or a slot move, on a cluster) during the archive: the commit's proof refused it.
    SkippedChanged,
    /// No longer terminal or idle, gone, already archived, leased to the engine, or being archived.
    SkippedIneligible,
    /// The caller's ACL does not allow archiving it.
    SkippedNoperm,
    /// Any other error, by its kind (`FlowError::kind`).
    Failed(&'static str),
    /// DRYRUN: eligible, so a sweep would archive it.
    WouldArchive,
    /// Still at the uploaders or in its commit when the sweep ended (it stopped early).
    InFlight,
}

impl Outcome {
    /// The outcome of a flow that stays live because of `err`: skipped (changed, not eligible, not
    /// allowed) or failed by kind. A new `FlowError` is a failure unless listed here.
    pub fn of(err: &FlowError) -> Outcome {
        match err {
            FlowError::Changed | FlowError::Moved(_) => Outcome::SkippedChanged,
            FlowError::NoPerm(_) => Outcome::SkippedNoperm,
            FlowError::NotFound
            | FlowError::NotTerminal(_)
            | FlowError::TooRecent { .. }
            | FlowError::Conflict(_)
            | FlowError::Leased(_)
            | FlowError::Busy
            | FlowError::Full(_) => Outcome::SkippedIneligible,
            _ => Outcome::Failed(err.kind()),
        }
    }

    /// Skipped or failed: the flow stays live, and may end so from any stage before its commit is done.
    fn stays_live(self) -> bool {
        matches!(
            self,
            Outcome::SkippedChanged
                | Outcome::SkippedIneligible
                | Outcome::SkippedNoperm
                | Outcome::Failed(_)
        )
    }
}

/// The edges a flow may take. Archived only after a commit; `InFlight` only while out at the
/// uploaders or committing; `WouldArchive` only straight from selection (DRYRUN reads nothing more);
/// nothing leaves `Done`, and no stage is skipped or taken backwards.
pub fn legal(from: State, to: State) -> bool {
    use Outcome::*;
    use State::*;
    match (from, to) {
        (Selected, Capturing) | (Capturing, Uploading) | (Uploading, Committing) => true,
        (Selected, Done(o)) => o.stays_live() || o == WouldArchive,
        (Capturing, Done(o)) => o.stays_live(),
        (Uploading, Done(o)) => o.stays_live() || o == InFlight,
        (Committing, Done(o)) => o.stays_live() || o == Archived || o == InFlight,
        _ => false,
    }
}

/// Whether a flow in `state` is out (at the uploaders or committing): counted in `in_flight`.
pub fn out(state: State) -> bool {
    matches!(state, State::Uploading | State::Committing)
}

/// One candidate of a sweep, from its selection to its outcome. Not `Clone`: only the ledger makes
/// one (`Ledger::select`) and ends one (`Ledger::finish`, which consumes it), so a flow has one token
/// and the token one outcome. A token dropped without an outcome is caught by the sweep's check.
#[derive(Debug)]
pub struct Flow {
    pub(super) id: String,
    pub(super) state: State,
}

impl Flow {
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome::*;
    use super::State::*;
    use super::*;

    const OUTCOMES: [Outcome; 8] = [
        Archived,
        SkippedChanged,
        SkippedIneligible,
        SkippedNoperm,
        Failed("unreadable"),
        Failed("s3_rejected"),
        WouldArchive,
        InFlight,
    ];
    const STAGES: [State; 4] = [Selected, Capturing, Uploading, Committing];

    fn all_states() -> Vec<State> {
        let done = OUTCOMES.iter().map(|o| Done(*o));
        STAGES.iter().copied().chain(done).collect()
    }

    #[test]
    fn stages_go_forward_one_at_a_time() {
        for from in all_states() {
            for to in STAGES {
                let expected = matches!(
                    (from, to),
                    (Selected, Capturing) | (Capturing, Uploading) | (Uploading, Committing)
                );
                assert_eq!(legal(from, to), expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn nothing_leaves_an_outcome() {
        for o in OUTCOMES {
            for to in all_states() {
                assert!(!legal(Done(o), to), "{o:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn each_outcome_is_reached_only_from_its_stages() {
        let live = [
            SkippedChanged,
            SkippedIneligible,
            SkippedNoperm,
            Failed("x"),
        ];
        for o in live {
            for from in STAGES {
                assert!(legal(from, Done(o)), "{from:?} may end {o:?}");
            }
        }
        let only = |o: Outcome, from: &[State]| {
            for s in STAGES {
                assert_eq!(legal(s, Done(o)), from.contains(&s), "{s:?} -> {o:?}");
            }
        };
        only(Archived, &[Committing]);
        only(InFlight, &[Uploading, Committing]);
        only(WouldArchive, &[Selected]);
    }

    #[test]
    fn in_flight_is_exactly_uploading_or_committing() {
        let outs: Vec<State> = all_states().into_iter().filter(|s| out(*s)).collect();
        assert_eq!(outs, vec![Uploading, Committing]);
    }

    #[test]
    fn errors_map_to_the_summary_counts_as_before() {
        let cases = [
            (FlowError::Changed, SkippedChanged),
            (FlowError::Moved("slot".into()), SkippedChanged),
            (FlowError::NoPerm("k".into()), SkippedNoperm),
            (FlowError::NotFound, SkippedIneligible),
            (FlowError::NotTerminal("active".into()), SkippedIneligible),
            (
                FlowError::TooRecent {
                    idle_ms: 1,
                    retention_ms: 2,
                },
                SkippedIneligible,
            ),
            (FlowError::Conflict("x".into()), SkippedIneligible),
            (FlowError::Leased("lease".into()), SkippedIneligible),
            (FlowError::Busy, SkippedIneligible),
            (FlowError::Full(1), SkippedIneligible),
            (FlowError::Unreadable("x".into()), Failed("unreadable")),
            (FlowError::Internal("x".into()), Failed("internal")),
            (FlowError::Unsafe("x".into()), Failed("unsafe")),
        ];
        for (err, expected) in cases {
            assert_eq!(Outcome::of(&err), expected, "{err:?}");
        }
    }
}
