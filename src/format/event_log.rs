//! A flow's event log as copied out of the server: every event end to end in a few large blocks, with
//! where each ends.
//!
//! The capture copies a log on the server's main thread, where one allocation per event is the
//! largest part of the copy's cost, and every one of them is later freed on another thread (which
//! the allocator makes dearer still). A handful of blocks per flow costs a handful of allocations, and
//! the commit's comparison, the writer and the fold then read long runs of memory.
//!
//! Blocks never move: a full block is followed by a new one as large as all before it together (at
//! least `FIRST_BLOCK`, at least the event, at most what `max_bytes` leaves), so the main thread never
//! copies a large log again to grow it, as one doubling buffer would (tens of milliseconds for a log
//! of tens of megabytes). What the blocks hold beyond their events is memory too: `growth` says,
//! before an event is copied, how much more memory its copy takes, so the module's budget for copies
//! counts the memory held, not only the bytes of the events.

use std::mem::size_of;

/// The first block's size, unless the first event is larger or `max_bytes` smaller: most logs fit.
const FIRST_BLOCK: usize = 4096;

/// The events of a log, in order.
#[derive(Clone, Debug)]
pub struct EventLog {
    /// Filled in order; each holds whole events and is never grown past its capacity.
    blocks: Vec<Vec<u8>>,
    /// Where each event ends in its block.
    ends: Vec<usize>,
    /// The index of each block's first event.
    firsts: Vec<usize>,
    /// The blocks together grow no further than this unless an event needs more (what the read
    /// copying into the log may copy at most).
    max_bytes: usize,
}

impl Default for EventLog {
    fn default() -> EventLog {
        EventLog::new(0, usize::MAX)
    }
}

impl PartialEq for EventLog {
    /// The same events in the same order, however they are laid out in blocks.
    fn eq(&self, other: &EventLog) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for EventLog {}

impl EventLog {
    /// An empty log with room for `events` events, whose blocks take `max_bytes` at most unless its
    /// events need more.
    pub fn new(events: usize, max_bytes: usize) -> EventLog {
        EventLog {
            blocks: Vec::new(),
            ends: Vec::with_capacity(events),
            firsts: Vec::new(),
            max_bytes,
        }
    }

    /// Appends one event, growing the log by `growth(event.len())` bytes of memory.
    pub fn push(&mut self, event: &[u8]) {
        if let Some(size) = self.new_block(event.len()) {
            if self.blocks.len() == self.blocks.capacity() {
                self.blocks.reserve_exact(self.blocks.len().max(4));
                self.firsts.reserve_exact(self.firsts.len().max(4));
            }
            self.blocks.push(Vec::with_capacity(size));
            self.firsts.push(self.ends.len());
        }
        if self.ends.len() == self.ends.capacity() {
            self.ends.reserve_exact(self.ends.len().max(4));
        }
        // `new_block` made room: the last block holds the event within its capacity.
        let block = self.blocks.last_mut().expect("a block holds the event");
        block.extend_from_slice(event);
        self.ends.push(block.len());
    }

    /// The size of the block an event of `len` bytes needs, if the last one has no room for it.
    fn new_block(&self, len: usize) -> Option<usize> {
        let room = self.blocks.last().map_or(0, |b| b.capacity() - b.len());
        if len <= room && !self.blocks.is_empty() {
            return None;
        }
        let capacity = self.capacity();
        let left = self.max_bytes.saturating_sub(capacity);
        Some(capacity.max(FIRST_BLOCK).min(left).max(len))
    }

    /// The bytes of every block together.
    fn capacity(&self) -> usize {
        self.blocks.iter().map(Vec::capacity).sum()
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
        self.blocks.iter().map(Vec::len).sum()
    }

    /// The memory the log holds: its blocks and its bookkeeping, as allocated.
    pub fn memory(&self) -> usize {
        self.capacity()
            + self.ends.capacity() * size_of::<usize>()
            + self.firsts.capacity() * size_of::<usize>()
            + self.blocks.capacity() * size_of::<Vec<u8>>()
    }

    /// How much more memory `push` of an event of `len` bytes takes.
    pub fn growth(&self, len: usize) -> usize {
        let grown = |n: usize, capacity: usize| match n < capacity {
            true => 0,
            false => n.max(4),
        };
        let ends = grown(self.ends.len(), self.ends.capacity()) * size_of::<usize>();
        let Some(block) = self.new_block(len) else {
            return ends;
        };
        let n = self.blocks.len();
        let lists = grown(n, self.blocks.capacity()) * size_of::<Vec<u8>>()
            + grown(n, self.firsts.capacity()) * size_of::<usize>();
        block + ends + lists
    }

    /// Gives back what the blocks hold beyond their events (a log kept, not grown any more). Not on
    /// the main thread: a block may be copied to shrink it.
    pub fn shrink_to_fit(&mut self) {
        self.blocks.iter_mut().for_each(Vec::shrink_to_fit);
        self.ends.shrink_to_fit();
        self.firsts.shrink_to_fit();
        self.blocks.shrink_to_fit();
    }

    /// The events in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + Clone + '_ {
        self.blocks.iter().enumerate().flat_map(move |(b, block)| {
            let first = self.firsts[b];
            let last = self.firsts.get(b + 1).copied().unwrap_or(self.ends.len());
            let ends = &self.ends[first..last];
            (0..ends.len()).map(move |i| {
                let from = i.checked_sub(1).map_or(0, |before| ends[before]);
                &block[from..ends[i]]
            })
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

    /// 2,000 events of mixed sizes (some larger than a block, some empty), from a fixed seed.
    fn mixed() -> Vec<Vec<u8>> {
        let mut seed = 7u64;
        (0..2_000u32)
            .map(|n| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len =
                    (seed >> 33) as usize % if seed.is_multiple_of(17) { 70_000 } else { 300 };
                vec![(n % 251) as u8; len]
            })
            .collect()
    }

    #[test]
    fn growth_is_the_memory_a_push_adds_and_blocks_stay_within_the_bounds() {
        let max = 1 << 22;
        let events = mixed();
        let mut log = EventLog::new(3, max);
        let mut placed: Vec<*const u8> = Vec::new();
        for event in &events {
            let (before, growth) = (log.memory(), log.growth(event.len()));
            log.push(event);
            // No block moves once placed: growing never copies what the log holds.
            let now: Vec<*const u8> = log.blocks.iter().map(|b| b.as_ptr()).collect();
            assert_eq!(now[..placed.len()], placed[..]);
            placed = now;
            assert_eq!(log.memory(), before + growth, "after {} events", log.len());
            // Each block is as large as all before it (or the event, or the rest of `max_bytes`),
            // and a block is left behind only for an event it cannot hold.
            assert!(log.capacity() <= 3 * log.bytes() + FIRST_BLOCK);
            let last = log.blocks.last().unwrap();
            assert!(log.capacity() <= max || last.capacity() == last.len());
        }
        assert!(log.blocks.len() > 3, "the events span several blocks");
        assert!(log.iter().eq(events.iter().map(Vec::as_slice)));
        assert_eq!(log.bytes(), events.iter().map(Vec::len).sum::<usize>());
        log.shrink_to_fit();
        assert!(log.iter().eq(events.iter().map(Vec::as_slice)));
        assert_eq!(log.capacity(), log.bytes());
    }

    #[test]
    fn logs_compare_by_their_events_not_their_blocks() {
        let events = mixed();
        let mut small = EventLog::new(0, 1 << 16);
        events.iter().for_each(|e| small.push(e));
        let large: EventLog = events.iter().collect();
        assert_eq!(small, large);
        let fewer: EventLog = events.iter().skip(1).collect();
        assert_ne!(fewer, large);
        // A copy counts the memory it holds (its blocks as large as their events), and grows by what
        // it says it takes.
        let mut copy = small.clone();
        assert_eq!(copy, small);
        assert_eq!(copy.capacity(), copy.bytes());
        let growth = copy.growth(10);
        let before = copy.memory();
        copy.push(b"0123456789");
        assert_eq!(copy.memory(), before + growth);
    }
}
