//! The tasks the view remembers, at most STATUS_CAPACITY of them, the oldest forgotten
//! first: a ring of entries in the order first seen, and an index from id to place.
//!
//! Its memory is set by the capacity at start. Held in one hash table of entries, as it was,
//! the view's memory grew by doubling: each growth copied the whole table into one twice its
//! size, and once full, the tombstones that forgetting leaves in a table three quarters full
//! made it double once more. The two tables side by side were the gateway's peak
//! (docs/PERFORMANCE.md). Here the entries sit in a ring sized once, and the table holds only
//! an id and a number each, sized so that it is never more than half full: there hashbrown
//! clears tombstones in place rather than grow.

use std::collections::{HashMap, VecDeque};

use uuid::Uuid;

use super::fold::Entry;

#[derive(Default)]
pub(super) struct Tasks {
    /// Each task's sequence number; its place in `ring` is that less `first`.
    index: HashMap<Uuid, u64>,
    /// The tasks in the order first seen, the oldest at the front.
    ring: VecDeque<(Uuid, Entry)>,
    /// The sequence number of the ring's front.
    first: u64,
}

impl Tasks {
    /// Room for `capacity` tasks, and one more (a new task is counted in before the oldest is
    /// forgotten). Only the pages written are resident, so an empty view costs little. If the
    /// room cannot be had at once (a huge STATUS_CAPACITY), it grows as it fills.
    pub(super) fn with_room_for(capacity: usize) -> Self {
        let mut tasks = Self::default();
        let room = capacity.saturating_add(1);
        let reserved = tasks.ring.try_reserve_exact(room).is_ok()
            && tasks.index.try_reserve(room.saturating_mul(2)).is_ok();
        if !reserved {
            tracing::warn!(
                capacity,
                "cannot set memory aside for STATUS_CAPACITY tasks at start; the status view grows as it fills"
            );
        }
        tasks
    }

    pub(super) fn len(&self) -> usize {
        self.ring.len()
    }

    pub(super) fn contains(&self, id: &Uuid) -> bool {
        self.index.contains_key(id)
    }

    pub(super) fn get(&self, id: &Uuid) -> Option<&Entry> {
        let place = self.place(id)?;
        self.ring.get(place).map(|(_, entry)| entry)
    }

    pub(super) fn get_mut(&mut self, id: &Uuid) -> Option<&mut Entry> {
        let place = self.place(id)?;
        self.ring.get_mut(place).map(|(_, entry)| entry)
    }

    /// Adds task `id`, which is not held yet, as the newest.
    pub(super) fn push(&mut self, id: Uuid, entry: Entry) {
        let sequence = self.first + self.ring.len() as u64;
        let before = self.index.insert(id, sequence);
        debug_assert!(before.is_none(), "task {id} was pushed twice");
        self.ring.push_back((id, entry));
    }

    /// Forgets the oldest task, and returns it.
    pub(super) fn pop_oldest(&mut self) -> Option<(Uuid, Entry)> {
        let (id, entry) = self.ring.pop_front()?;
        self.first += 1;
        self.index.remove(&id);
        Some((id, entry))
    }

    /// Every entry, oldest first.
    pub(super) fn entries_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.ring.iter_mut().map(|(_, entry)| entry)
    }

    /// Every id, newest first.
    pub(super) fn newest_first(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.ring.iter().rev().map(|(id, _)| *id)
    }

    fn place(&self, id: &Uuid) -> Option<usize> {
        let sequence = self.index.get(id)?;
        usize::try_from(sequence.checked_sub(self.first)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_found_by_id_and_forgotten_oldest_first() {
        let mut tasks = Tasks::with_room_for(3);
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for (kind, id) in (0..).zip(&ids) {
            tasks.push(*id, Entry::new(kind, true));
        }
        assert_eq!(tasks.len(), 4);
        assert_eq!(
            tasks.newest_first().collect::<Vec<_>>(),
            [ids[3], ids[2], ids[1], ids[0]]
        );
        let (oldest, _) = tasks.pop_oldest().expect("one to forget");
        assert_eq!(oldest, ids[0]);
        assert!(!tasks.contains(&ids[0]) && tasks.get(&ids[0]).is_none());
        for (kind, id) in (1..).zip(&ids[1..]) {
            assert_eq!(tasks.get(id).map(|entry| entry.kind), Some(kind));
        }
        tasks.get_mut(&ids[2]).expect("held").attempts = 7;
        assert_eq!(tasks.get(&ids[2]).map(|entry| entry.attempts), Some(7));
        assert_eq!(tasks.entries_mut().count(), 3);
    }

    #[test]
    fn a_full_view_that_keeps_forgetting_never_grows_its_tables() {
        const CAPACITY: usize = 10_000;
        let mut tasks = Tasks::with_room_for(CAPACITY);
        let (index, ring) = (tasks.index.capacity(), tasks.ring.capacity());
        // Ten times over: every removal leaves a tombstone or a free slot in the table.
        for n in 0..10 * CAPACITY {
            let id = Uuid::new_v4();
            tasks.push(id, Entry::new(0, true));
            if tasks.len() > CAPACITY {
                tasks.pop_oldest();
            }
            assert!(tasks.get(&id).is_some(), "task {n} is held");
        }
        assert_eq!(tasks.len(), CAPACITY);
        // A table's capacity is what it can take before it grows: tombstones lower it,
        // clearing them in place restores it, growing would double it.
        assert!(
            tasks.index.capacity() <= index,
            "{} > {index}",
            tasks.index.capacity()
        );
        assert_eq!(tasks.ring.capacity(), ring);
    }
}
