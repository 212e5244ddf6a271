//! A flow's event log as copied out of the server: every event end to end in one buffer, with where
//! each ends.
//!
//! The capture copies a log on the server's main thread, where one allocation per event is the
//! largest part of the copy's cost, and every one of them is later freed on another thread (which
//! the allocator makes dearer still). One buffer that grows by doubling costs a handful of
//! allocations per flow, and the commit's comparison, the writer and the fold then read one run of
//! memory.

/// The events of a log, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventLog {
    bytes: Vec<u8>,
    /// Where each event ends in `bytes`.
    ends: Vec<usize>,
}

impl EventLog {
    /// An empty log with room for `events` events.
    pub fn with_capacity(events: usize) -> EventLog {
        EventLog {
            bytes: Vec::new(),
            ends: Vec::with_capacity(events),
        }
    }

    /// Appends one event.
    pub fn push(&mut self, event: &[u8]) {
        self.bytes.extend_from_slice(event);
        self.ends.push(self.bytes.len());
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The events' bytes together (no separators).
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The events in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + Clone + '_ {
        (0..self.ends.len()).map(|i| {
            let from = i.checked_sub(1).map_or(0, |before| self.ends[before]);
            &self.bytes[from..self.ends[i]]
        })
    }
}

impl<E: AsRef<[u8]>> FromIterator<E> for EventLog {
    fn from_iter<I: IntoIterator<Item = E>>(events: I) -> EventLog {
        let mut log = EventLog::default();
        events.into_iter().for_each(|e| log.push(e.as_ref()));
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_they_were_empty_ones_too() {
        for events in [
            vec![],
            vec![vec![]],
            vec![b"".to_vec(), b"ab".to_vec(), b"".to_vec(), b"c".to_vec()],
        ] {
            let log: EventLog = events.iter().collect();
            assert_eq!(log.len(), events.len());
            assert_eq!(log.bytes(), events.iter().map(Vec::len).sum::<usize>());
            assert_eq!(
                log.iter().collect::<Vec<_>>(),
                events.iter().map(Vec::as_slice).collect::<Vec<_>>()
            );
        }
    }
}
