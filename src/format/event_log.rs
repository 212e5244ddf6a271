//! A flow's event log as copied out of the server: every event end to end in one buffer, with where
//! each ends.
//!
//! The capture copies a log on the server's main thread, where one allocation per event is the
//! largest part of the copy's cost, and every one of them is later freed on another thread (which
//! the allocator makes dearer still). One buffer that grows by doubling costs a handful of
//! allocations per flow, and the commit's comparison, the writer and the fold then read one run of
//! memory.
//!
//! What the buffer holds beyond its events is memory too: `growth` says, before an event is copied,
//! how much more memory its copy takes (the buffer doubles when full, as a `Vec` does, but by this
//! type's own rule so the figure is exact), so the module's budget for copies counts the memory held,
//! not only the bytes of the events.

/// The events of a log, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLog {
    bytes: Vec<u8>,
    /// Where each event ends in `bytes`.
    ends: Vec<usize>,
    /// The buffer doubles no further than this (what the read copying into it may copy at most).
    max_bytes: usize,
}

impl Default for EventLog {
    fn default() -> EventLog {
        EventLog::new(0, usize::MAX)
    }
}

impl EventLog {
    /// An empty log with room for `events` events, whose buffer grows to `max_bytes` at most unless
    /// its events need more.
    pub fn new(events: usize, max_bytes: usize) -> EventLog {
        EventLog {
            bytes: Vec::new(),
            ends: Vec::with_capacity(events),
            max_bytes,
        }
    }

    /// Appends one event, growing the log by `growth(event.len())` bytes of memory.
    pub fn push(&mut self, event: &[u8]) {
        let (bytes, ends) = self.capacities_for(event.len());
        self.bytes.reserve_exact(bytes - self.bytes.len());
        self.ends.reserve_exact(ends - self.ends.len());
        self.bytes.extend_from_slice(event);
        self.ends.push(self.bytes.len());
    }

    /// The capacities of the buffer and of the ends once an event of `len` bytes is added: unchanged
    /// while it fits, else doubled (at least to fit; the buffer to `max_bytes` at most).
    fn capacities_for(&self, len: usize) -> (usize, usize) {
        let grown = |used: usize, capacity: usize, min: usize, max: usize| match used <= capacity {
            true => capacity,
            false => used.max(capacity.saturating_mul(2).max(min).min(max)),
        };
        let bytes = grown(
            self.bytes.len() + len,
            self.bytes.capacity(),
            64,
            self.max_bytes,
        );
        (
            bytes,
            grown(self.ends.len() + 1, self.ends.capacity(), 4, usize::MAX),
        )
    }

    /// The memory the log holds: its buffer and its ends, as allocated.
    pub fn memory(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    /// How much more memory `push` of an event of `len` bytes takes.
    pub fn growth(&self, len: usize) -> usize {
        let (bytes, ends) = self.capacities_for(len);
        (bytes - self.bytes.capacity())
            + (ends - self.ends.capacity()) * std::mem::size_of::<usize>()
    }

    /// Gives back what the buffer holds beyond its events (a log kept, not grown any more).
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
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

    #[test]
    fn growth_is_the_memory_a_push_adds_and_stays_within_twice_the_events() {
        let max = 1 << 22;
        let mut log = EventLog::new(3, max);
        let mut seed = 7u64;
        for _ in 0..2_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) as usize % if seed.is_multiple_of(17) { 70_000 } else { 300 };
            let (before, growth) = (log.memory(), log.growth(len));
            log.push(&vec![b'x'; len]);
            assert_eq!(log.memory(), before + growth, "after {} events", log.len());
            let ends = log.len() * std::mem::size_of::<usize>();
            assert!(log.memory() <= 2 * (log.bytes() + ends) + 64 + 32);
            assert!(log.bytes.capacity() <= max || log.bytes.capacity() == log.bytes());
        }
        log.shrink_to_fit();
        assert_eq!(
            log.memory(),
            log.bytes() + log.len() * std::mem::size_of::<usize>()
        );
    }
}
