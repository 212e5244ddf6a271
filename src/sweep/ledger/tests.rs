use std::sync::Arc;

use super::*;
use crate::archive;
use crate::sweep::flow::Outcome::*;
use crate::sweep::flow::State::*;

fn ledger(dry_run: bool) -> Ledger {
    Ledger::new(Arc::new(Progress::new(dry_run)))
}

fn with_shift(shift: Shift) -> Ledger {
    Ledger {
        shift,
        ..ledger(false)
    }
}

/// Walks one flow through `stages`, then ends it with `outcome`.
fn walk(l: &mut Ledger, id: &str, stages: &[State], outcome: Outcome) {
    let mut flow = l.select(id.to_string());
    for s in stages {
        l.advance(&mut flow, *s);
    }
    l.finish(flow, outcome);
}

fn done(raw: u64, stored: u64, us: u64) -> archive::Archived {
    archive::Archived {
        main_thread_us: us,
        location: "s3://b/k".into(),
        events: 3,
        raw_bytes: raw,
        stored_bytes: stored,
        sha256: String::new(),
    }
}

/// Every legal walk from selection to each outcome that can end it there.
fn legal_walks() -> Vec<(Vec<State>, Outcome)> {
    let live = [
        SkippedChanged,
        SkippedIneligible,
        SkippedNoperm,
        Failed("s3_rejected"),
    ];
    let prefixes: [&[State]; 4] = [
        &[],
        &[Capturing],
        &[Capturing, Uploading],
        &[Capturing, Uploading, Committing],
    ];
    let mut walks = Vec::new();
    for prefix in prefixes {
        for o in live {
            walks.push((prefix.to_vec(), o));
        }
    }
    walks.push((vec![], WouldArchive));
    walks.push((vec![Capturing, Uploading], InFlight));
    walks.push((vec![Capturing, Uploading, Committing], InFlight));
    walks.push((vec![Capturing, Uploading, Committing], Archived));
    walks
}

#[test]
fn every_legal_walk_adds_up_to_one_outcome() {
    for (stages, outcome) in legal_walks() {
        let mut l = ledger(outcome == WouldArchive);
        walk(&mut l, "f", &stages, outcome);
        assert_eq!(l.check(), Vec::<String>::new(), "{stages:?} -> {outcome:?}");
        let c = l.progress().counts();
        assert_eq!(c.candidates, 1);
        assert_eq!(c.outcomes(), 1, "{stages:?} -> {outcome:?}: one outcome");
        assert_eq!(c.in_flight, (outcome == InFlight) as u64, "{outcome:?}");
    }
}

#[test]
fn a_mixed_sweep_adds_up_and_in_flight_follows_the_flows_out() {
    let mut l = ledger(false);
    let mut out: Vec<Flow> = (0..3)
        .map(|i| {
            let mut f = l.select(format!("up-{i}"));
            l.advance(&mut f, Capturing);
            l.advance(&mut f, Uploading);
            f
        })
        .collect();
    walk(&mut l, "gone", &[], SkippedIneligible);
    walk(&mut l, "acl", &[], SkippedNoperm);
    walk(&mut l, "long", &[Capturing], Failed("unreadable"));
    assert_eq!(l.progress().counts().in_flight, 3, "three flows out");
    let mut first = out.remove(0);
    l.advance(&mut first, Committing);
    l.archived(first, &done(100, 20, 7));
    let second = out.remove(0);
    l.finish(second, Failed("s3_timeout"));
    let mut third = out.remove(0);
    l.advance(&mut third, Committing);
    l.finish(third, SkippedChanged);
    assert_eq!(l.check(), Vec::<String>::new());
    let fields: BTreeMap<&str, i64> = l.progress().fields().into_iter().collect();
    assert_eq!(fields["candidates"], 6);
    assert_eq!(fields["archived"], 1);
    assert_eq!(fields["skipped_changed"], 1);
    assert_eq!(fields["skipped_ineligible"], 1);
    assert_eq!(fields["skipped_noperm"], 1);
    assert_eq!(fields["failed"], 2);
    assert_eq!(fields["in_flight"], 0);
    assert_eq!(fields["raw_bytes"], 100);
    assert_eq!(fields["stored_bytes"], 20);
    assert_eq!(fields["main_thread_max_us"], 7);
}

#[test]
fn flows_still_out_when_a_sweep_stops_end_in_flight() {
    let mut l = ledger(false);
    walk(&mut l, "a", &[Capturing, Uploading], InFlight);
    walk(&mut l, "b", &[Capturing, Uploading, Committing], InFlight);
    walk(&mut l, "c", &[Capturing, Uploading, Committing], Archived);
    assert_eq!(l.check(), Vec::<String>::new());
    let c = l.progress().counts();
    assert_eq!((c.candidates, c.archived, c.in_flight), (3, 1, 2));
}

#[test]
fn dry_run_lists_the_flows_it_would_archive() {
    let mut l = ledger(true);
    walk(&mut l, "yes", &[], WouldArchive);
    walk(&mut l, "no", &[], SkippedIneligible);
    assert_eq!(l.check(), Vec::<String>::new());
    let c = l.progress().counts();
    assert_eq!((c.candidates, c.would_archive, c.archived), (2, 1, 0));
}

#[test]
fn a_flow_without_an_outcome_is_caught() {
    let mut l = ledger(false);
    walk(&mut l, "ok", &[], SkippedIneligible);
    let mut lost = l.select("lost".into());
    l.advance(&mut lost, Capturing);
    drop(lost);
    let wrong = l.check();
    assert!(
        wrong
            .iter()
            .any(|w| w == "1 of 2 candidates have no outcome"),
        "{wrong:?}"
    );
    assert!(
        wrong.iter().any(|w| w.starts_with("candidates=2 but")),
        "{wrong:?}"
    );
}

#[test]
fn an_illegal_transition_is_caught() {
    for (stages, outcome) in [
        (vec![], Archived),
        (vec![Capturing], InFlight),
        (vec![Capturing, Uploading], Archived),
        (vec![Capturing, Uploading], WouldArchive),
    ] {
        let mut l = ledger(false);
        walk(&mut l, "f", &stages, outcome);
        let wrong = l.check();
        assert!(
            wrong.iter().any(|w| w.contains("moved")),
            "{stages:?} -> {outcome:?}: {wrong:?}"
        );
    }
    let mut l = ledger(false);
    let mut f = l.select("f".into());
    l.advance(&mut f, Uploading);
    l.advance(&mut f, Capturing);
    l.finish(f, Failed("internal"));
    let wrong = l.check();
    let moved = wrong.iter().filter(|w| w.contains("moved")).count();
    assert_eq!(moved, 2, "{wrong:?}");
}

#[test]
fn an_outcome_given_by_advance_is_caught_and_the_flow_stays_open() {
    let mut l = ledger(false);
    let mut f = l.select("f".into());
    l.advance(&mut f, Done(Archived));
    assert_eq!(f.state, Selected);
    l.finish(f, SkippedIneligible);
    let wrong = l.check();
    assert_eq!(wrong.len(), 1, "{wrong:?}");
    assert!(wrong[0].contains("without being ended"), "{wrong:?}");
}

/// A deliberately broken transition: it forgets to release `in_flight` when a flow that was out ends.
fn forgets_in_flight(p: &Progress, id: &str, from: Option<State>, to: State) {
    let from = match to {
        Done(_) => None,
        _ => from,
    };
    p.shift(id, from, to);
}

/// A deliberately broken transition: it counts an archived flow twice.
fn counts_archived_twice(p: &Progress, id: &str, from: Option<State>, to: State) {
    p.shift(id, from, to);
    if to == Done(Archived) {
        p.shift(id, None, to);
    }
}

/// A deliberately broken transition: a candidate is not counted.
fn forgets_candidates(p: &Progress, id: &str, from: Option<State>, to: State) {
    if to != Selected {
        p.shift(id, from, to);
    }
}

/// A deliberately broken transition: it counts one kind of failure as another.
fn mislabels_failures(p: &Progress, id: &str, from: Option<State>, to: State) {
    let to = match to {
        Done(Failed(_)) => Done(Failed("internal")),
        _ => to,
    };
    p.shift(id, from, to);
}

#[test]
fn a_broken_transition_is_caught() {
    let cases: [(Shift, &str); 4] = [
        (forgets_in_flight, "in_flight=1 but 0 flows ended so"),
        (counts_archived_twice, "archived=2 but 1 flows ended so"),
        (forgets_candidates, "candidates=0 but 1 flows were selected"),
        (mislabels_failures, "failed_by_reason="),
    ];
    for (shift, expected) in cases {
        let mut l = with_shift(shift);
        let outcome = match expected {
            e if e.starts_with("failed") => Failed("s3_timeout"),
            _ => Archived,
        };
        walk(&mut l, "f", &[Capturing, Uploading, Committing], outcome);
        let wrong = l.check();
        assert!(
            wrong.iter().any(|w| w.starts_with(expected)),
            "{expected}: {wrong:?}"
        );
    }
}

#[test]
fn a_count_changed_outside_the_ledger_is_caught() {
    let mut l = ledger(false);
    walk(&mut l, "f", &[Capturing, Uploading, Committing], Archived);
    // As a coordinator that counted a flow on its own would.
    l.progress().shift("f", None, Done(SkippedChanged));
    let wrong = l.check();
    assert!(
        wrong
            .iter()
            .any(|w| w == "skipped_changed=1 but 0 flows ended so"),
        "{wrong:?}"
    );
    assert!(
        wrong.iter().any(|w| w.starts_with("candidates=1 but")),
        "{wrong:?}"
    );
}

#[test]
fn anomalies_are_described_up_to_a_bound() {
    let mut l = ledger(false);
    for i in 0..100 {
        l.anomaly(format!("anomaly {i}"));
    }
    let wrong = l.check();
    assert_eq!(wrong.len(), DESCRIBED + 1, "{wrong:?}");
    assert_eq!(
        wrong[DESCRIBED],
        format!("{} more anomalies", 100 - DESCRIBED)
    );
}
