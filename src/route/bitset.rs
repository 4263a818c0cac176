//! A set of slab slot indices whose memory follows its population, not its highest slot.
//!
//! Two representations, switched automatically:
//!
//! - **Sparse**: a sorted `Vec<u32>` of slots, 4 bytes per member. A per-vehicle set holding
//!   only slot 19 000 costs one small allocation, not 300 words.
//! - **Dense**: a bit vector of `u64` words from slot 0, used once it is at most half the size
//!   of the sparse list (`2 * words <= len`), and kept while it is no larger than twice that
//!   size (`words <= len`). The gap between the two thresholds stops a set at the boundary
//!   from converting back and forth on every insert/remove.
//!
//! Either way a set costs at most about 16 bytes per member plus a small constant (vector
//! capacity slack included); see [`BitSet::heap_bytes`]. Slots must fit in a `u32`.

use std::mem::size_of;

#[derive(Debug, Clone)]
enum Repr {
    /// Strictly increasing slots.
    Sparse(Vec<u32>),
    /// Bit `i % 64` of `words[i / 64]`; the last word is non-zero, `len` is the popcount and
    /// `words.len() <= len`.
    Dense { words: Vec<u64>, len: usize },
}

#[derive(Debug, Clone)]
pub struct BitSet(Repr);

impl Default for BitSet {
    fn default() -> Self {
        BitSet(Repr::Sparse(Vec::new()))
    }
}

/// Most sets [`for_each_in_union`] merges with per-set cursors; more go through windows.
const MAX_MERGED: usize = 4;

/// Words spanned by a union window in `union_by_windows` (1 024 slots, 128 bytes of stack).
const WINDOW: usize = 16;

impl BitSet {
    /// Sets bit `i`; returns true if it was clear.
    ///
    /// # Panics
    /// If `i` does not fit in a `u32`.
    pub fn insert(&mut self, i: usize) -> bool {
        let x = u32::try_from(i).expect("BitSet slot exceeds u32::MAX");
        match &mut self.0 {
            Repr::Sparse(v) => {
                let pos = match v.last() {
                    Some(&last) if last < x => v.len(),
                    None => 0,
                    _ => match v.binary_search(&x) {
                        Ok(_) => return false,
                        Err(pos) => pos,
                    },
                };
                if v.len() == v.capacity() {
                    // Double from 2 (one 8-byte allocation) rather than Vec's minimum of 4.
                    v.reserve_exact(v.len().max(2));
                }
                v.insert(pos, x);
                let words = *v.last().unwrap() as usize / 64 + 1;
                if 2 * words <= v.len() {
                    self.0 = to_dense(v, words);
                }
                true
            }
            Repr::Dense { words, len } => {
                let (w, b) = (i / 64, i % 64);
                if w >= words.len() {
                    if w + 1 > *len + 1 {
                        // Growing the words would cost more than 8 bytes per member.
                        let mut v = to_sparse(words, *len + 1);
                        v.push(x);
                        self.0 = Repr::Sparse(v);
                        return true;
                    }
                    words.resize(w + 1, 0);
                }
                let was = words[w] & (1 << b) != 0;
                words[w] |= 1 << b;
                *len += !was as usize;
                !was
            }
        }
    }

    /// Clears bit `i`; returns true if it was set.
    pub fn remove(&mut self, i: usize) -> bool {
        let Ok(x) = u32::try_from(i) else {
            return false;
        };
        match &mut self.0 {
            Repr::Sparse(v) => {
                let Ok(pos) = v.binary_search(&x) else {
                    return false;
                };
                v.remove(pos);
                if let Some(&last) = v.last() {
                    let words = last as usize / 64 + 1;
                    if 2 * words <= v.len() {
                        // Dropping the highest slot can make the dense form the smaller one.
                        self.0 = to_dense(v, words);
                    } else if v.capacity() > 4 * v.len() {
                        v.shrink_to(2 * v.len());
                    }
                } else {
                    *v = Vec::new();
                }
                true
            }
            Repr::Dense { words, len } => {
                let (w, b) = (i / 64, i % 64);
                let Some(word) = words.get_mut(w) else {
                    return false;
                };
                if *word & (1 << b) == 0 {
                    return false;
                }
                *word &= !(1 << b);
                *len -= 1;
                while words.last() == Some(&0) {
                    words.pop();
                }
                if *len == 0 || words.len() > *len {
                    self.0 = Repr::Sparse(to_sparse(words, *len));
                } else if words.capacity() > 2 * words.len() {
                    words.shrink_to_fit();
                }
                true
            }
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        match &self.0 {
            Repr::Sparse(v) => u32::try_from(i).is_ok_and(|x| v.binary_search(&x).is_ok()),
            Repr::Dense { words, .. } => {
                words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
            }
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Sparse(v) => v.len(),
            Repr::Dense { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this set holds on the heap (allocated capacity, excluding the inline struct).
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::Sparse(v) => v.capacity() * size_of::<u32>(),
            Repr::Dense { words, .. } => words.capacity() * size_of::<u64>(),
        }
    }

    /// Index of the first word holding a member, if any.
    fn first_word(&self) -> Option<usize> {
        match &self.0 {
            Repr::Sparse(v) => v.first().map(|&x| x as usize / 64),
            Repr::Dense { words, .. } => (!words.is_empty()).then_some(0),
        }
    }
}

/// The dense form of the sorted, non-empty `v` whose highest slot lies in word `n_words - 1`.
fn to_dense(v: &[u32], n_words: usize) -> Repr {
    let mut words = vec![0u64; n_words];
    for &x in v {
        words[x as usize / 64] |= 1 << (x % 64);
    }
    Repr::Dense {
        words,
        len: v.len(),
    }
}

/// The sorted slots of `words` (of which there are `len`), with room for `cap` of them.
fn to_sparse(words: &[u64], cap: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(cap);
    for (w, &word) in words.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            v.push((w * 64) as u32 + word.trailing_zeros());
            word &= word - 1;
        }
    }
    v
}

/// Calls `f` once for every bit set in any of `sets` (their union), in increasing order.
///
/// Does not allocate. For up to [`MAX_MERGED`] sets (the index passes 1 to 4): walks the
/// words of the dense sets, folding in the members of the sparse sets that fall below
/// their end, then merges the sparse members past it. Each set's members cost one step,
/// so a sparse set with a high slot costs nothing per word in between.
pub fn for_each_in_union(sets: &[&BitSet], mut f: impl FnMut(usize)) {
    if sets.len() > MAX_MERGED {
        return union_by_windows(sets, f);
    }
    let mut dense: [&[u64]; MAX_MERGED] = [&[]; MAX_MERGED];
    let mut sparse: [&[u32]; MAX_MERGED] = [&[]; MAX_MERGED];
    let (mut n_dense, mut n_sparse) = (0, 0);
    for s in sets {
        match &s.0 {
            Repr::Dense { words, .. } => {
                dense[n_dense] = words;
                n_dense += 1;
            }
            Repr::Sparse(v) if v.is_empty() => {}
            Repr::Sparse(v) => {
                sparse[n_sparse] = v;
                n_sparse += 1;
            }
        }
    }
    let (dense, sparse) = (&dense[..n_dense], &mut sparse[..n_sparse]);
    let n_words = dense.iter().map(|d| d.len()).max().unwrap_or(0);
    // Lowest sparse member not yet folded in.
    let mut next = sparse
        .iter()
        .map(|r| r[0] as usize)
        .min()
        .unwrap_or(usize::MAX);
    for w in 0..n_words {
        let mut word = dense
            .iter()
            .fold(0u64, |acc, d| acc | d.get(w).copied().unwrap_or(0));
        let end = (w + 1) * 64;
        if next < end {
            next = usize::MAX;
            for r in sparse.iter_mut() {
                while let Some((&x, tail)) = r.split_first() {
                    if x as usize >= end {
                        next = next.min(x as usize);
                        break;
                    }
                    word |= 1 << (x % 64);
                    *r = tail;
                }
            }
        }
        emit(w, word, &mut f);
    }
    if next == usize::MAX {
        return;
    }
    // Only sparse members remain, all past the dense words.
    if let [r] = sparse {
        r.iter().for_each(|&x| f(x as usize));
        return;
    }
    while let Some(m) = sparse.iter().filter_map(|r| r.first().copied()).min() {
        f(m as usize);
        for r in sparse.iter_mut() {
            if r.first() == Some(&m) {
                *r = &r[1..];
            }
        }
    }
}

/// The union of any number of sets, built one window of [`WINDOW`] words at a time on the
/// stack, each window starting at the next word holding a member.
fn union_by_windows(sets: &[&BitSet], mut f: impl FnMut(usize)) {
    let mut start = sets.iter().filter_map(|s| s.first_word()).min();
    while let Some(w0) = start {
        let lo = w0 * 64;
        let hi = lo + WINDOW * 64;
        let mut buf = [0u64; WINDOW];
        let mut next = usize::MAX;
        for s in sets {
            match &s.0 {
                Repr::Dense { words, .. } => {
                    let Some(src) = words.get(w0..) else { continue };
                    for (b, w) in buf.iter_mut().zip(src) {
                        *b |= w;
                    }
                    if src.len() > WINDOW {
                        next = next.min(w0 + WINDOW);
                    }
                }
                Repr::Sparse(v) => {
                    let from = v.partition_point(|&x| (x as usize) < lo);
                    for &x in &v[from..] {
                        let x = x as usize;
                        if x >= hi {
                            next = next.min(x / 64);
                            break;
                        }
                        buf[(x - lo) / 64] |= 1 << (x % 64);
                    }
                }
            }
        }
        for (k, word) in buf.into_iter().enumerate() {
            emit(w0 + k, word, &mut f);
        }
        start = (next != usize::MAX).then_some(next);
    }
}

#[inline(always)]
fn emit(w: usize, mut word: u64, f: &mut impl FnMut(usize)) {
    while word != 0 {
        f(w * 64 + word.trailing_zeros() as usize);
        word &= word - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn is_dense(s: &BitSet) -> bool {
        matches!(s.0, Repr::Dense { .. })
    }

    fn union(sets: &[&BitSet]) -> Vec<usize> {
        let mut seen = Vec::new();
        for_each_in_union(sets, |i| seen.push(i));
        seen
    }

    /// Representation invariants and the memory bound.
    fn check(s: &BitSet) {
        match &s.0 {
            Repr::Sparse(v) => {
                assert!(
                    v.windows(2).all(|p| p[0] < p[1]),
                    "sparse not sorted: {v:?}"
                );
                if let Some(&last) = v.last() {
                    // Would-be dense form is more than half the sparse size.
                    assert!(2 * (last as usize / 64 + 1) > v.len());
                }
            }
            Repr::Dense { words, len } => {
                assert_eq!(words.last().map(|&w| w != 0), Some(true));
                let pop: u32 = words.iter().map(|w| w.count_ones()).sum();
                assert_eq!(pop as usize, *len);
                assert!(words.len() <= *len);
            }
        }
        assert!(
            s.heap_bytes() <= 16 * s.len() + 16,
            "{} bytes for {} members",
            s.heap_bytes(),
            s.len()
        );
    }

    #[test]
    fn insert_remove_union() {
        let mut a = BitSet::default();
        let mut b = BitSet::default();
        assert!(a.insert(3) && a.insert(200) && !a.insert(3));
        assert!(b.insert(3) && b.insert(64));
        assert_eq!(a.len(), 2);
        assert_eq!(union(&[&a, &b]), vec![3, 64, 200]);
        assert!(a.remove(200) && !a.remove(200));
        assert!(a.contains(3) && !a.contains(200));
        assert_eq!(union(&[]), Vec::<usize>::new());
        assert!(!a.remove(usize::MAX) && !a.contains(usize::MAX));
    }

    #[test]
    fn switches_representation_both_ways() {
        let mut s = BitSet::default();
        for i in 0..1000 {
            s.insert(i);
            check(&s);
        }
        assert!(is_dense(&s));
        // A far slot would need ~1 500 words for ~1 000 members: back to sparse.
        s.insert(100_000);
        check(&s);
        assert!(!is_dense(&s));
        s.remove(100_000);
        s.insert(1000);
        check(&s);
        assert!(is_dense(&s));
        for i in (0..=1000).rev() {
            assert!(s.remove(i));
            check(&s);
        }
        assert!(s.is_empty() && !is_dense(&s) && s.heap_bytes() == 0);
    }

    #[test]
    fn union_mixes_dense_and_sparse_across_windows() {
        let mut all = BitSet::default();
        let mut v = BitSet::default();
        let mut t = BitSet::default();
        (0..3000).step_by(3).for_each(|i| {
            all.insert(i);
        });
        let v_slots = [1, 3, 1024, 1025, 2047, 2048, 2999, 3001, 19_000, 99_999];
        for i in v_slots {
            v.insert(i);
        }
        t.insert(1023);
        t.insert(19_000);
        assert!(is_dense(&all) && !is_dense(&v) && !is_dense(&t));
        let mut expected: BTreeSet<usize> = (0..3000).step_by(3).collect();
        expected.extend(v_slots);
        expected.insert(1023);
        let expected: Vec<usize> = expected.into_iter().collect();
        assert_eq!(union(&[&all, &v, &t]), expected);
        assert_eq!(union(&[&t, &v, &all, &v]), expected);
        assert_eq!(union(&[&t, &v, &all, &v, &t]), expected);
        assert_eq!(
            union(&[&v, &t]),
            vec![
                1, 3, 1023, 1024, 1025, 2047, 2048, 2999, 3001, 19_000, 99_999
            ]
        );
    }

    #[test]
    fn union_at_window_boundaries() {
        let ends = (1..=3).flat_map(|k| k * WINDOW * 64 - 70..k * WINDOW * 64 + 70);
        for end in ends.step_by(3) {
            let mut dense = BitSet::default();
            (0..=end).step_by(2).for_each(|i| {
                dense.insert(i);
            });
            dense.insert(end);
            assert!(is_dense(&dense));
            for extra in [
                None,
                Some(1),
                Some(end + 1),
                Some(end + 64),
                Some(end + 5000),
            ] {
                let mut sparse = BitSet::default();
                if let Some(x) = extra {
                    sparse.insert(x);
                }
                let mut expected: BTreeSet<usize> = (0..=end).step_by(2).collect();
                expected.insert(end);
                expected.extend(extra);
                let expected: Vec<usize> = expected.into_iter().collect();
                let empty = BitSet::default();
                for sets in [
                    &[&dense, &sparse][..],
                    &[&sparse, &dense],
                    &[&sparse, &empty, &dense, &empty, &sparse],
                ] {
                    assert_eq!(union(sets), expected, "end {end} extra {extra:?}");
                }
            }
        }
    }

    #[test]
    fn memory_follows_population_not_slot() {
        let mut one = BitSet::default();
        one.insert(19_000);
        assert!(one.heap_bytes() < 64, "{}", one.heap_bytes());

        let sets: Vec<BitSet> = (0..256)
            .map(|k| {
                let mut s = BitSet::default();
                s.insert(19_000 + 97 * k);
                s
            })
            .collect();
        let total: usize = sets.iter().map(BitSet::heap_bytes).sum();
        assert!(total <= 4096, "{total}");

        let mut dense = BitSet::default();
        (0..1000).for_each(|i| {
            dense.insert(i);
        });
        assert!(is_dense(&dense));
        assert!(dense.heap_bytes() <= 1000 / 8 + 8, "{}", dense.heap_bytes());
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Insert(usize, usize),
        Remove(usize, usize),
    }

    fn slot() -> impl Strategy<Value = usize> {
        // Small ranges drive sets dense; wide ones push them back to sparse.
        prop_oneof![0..200usize, 0..2_000usize, 0..100_000usize]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, slot()).prop_map(|(s, i)| Op::Insert(s, i)),
            2 => (0..3usize, slot()).prop_map(|(s, i)| Op::Remove(s, i)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_btreeset_model(
            // Bursts of dense inserts, so sets cross the dense threshold mid-sequence.
            // Bursts of (set, first slot, count, stride) inserts, so sets cross the dense
            // threshold mid-sequence and some dense sets span several union windows.
            bursts in prop::collection::vec(
                (0..3usize, 0..2_000usize, 0..600usize, 1..4usize),
                0..4,
            ),
            ops in prop::collection::vec(op(), 0..400),
            probes in prop::collection::vec(slot(), 0..32),
        ) {
            let mut sets = [BitSet::default(), BitSet::default(), BitSet::default()];
            let mut model: [BTreeSet<usize>; 3] = Default::default();
            let burst_ops = bursts.iter().flat_map(|&(s, base, n, stride)| {
                (0..n).map(move |k| Op::Insert(s, base + k * stride))
            });
            for op in burst_ops.chain(ops.iter().copied()) {
                match op {
                    Op::Insert(s, i) => prop_assert_eq!(sets[s].insert(i), model[s].insert(i)),
                    Op::Remove(s, i) => prop_assert_eq!(sets[s].remove(i), model[s].remove(&i)),
                }
                prop_assert_eq!(sets[s_of(&op)].len(), model[s_of(&op)].len());
                check(&sets[s_of(&op)]);
            }
            for (s, m) in sets.iter().zip(&model) {
                prop_assert_eq!(s.is_empty(), m.is_empty());
                for &i in probes.iter().chain(m.iter()) {
                    prop_assert_eq!(s.contains(i), m.contains(&i));
                }
            }
            let [a, b, c] = &sets;
            // Up to MAX_MERGED sets take the merge path, more the window path.
            let subsets: [&[&BitSet]; 10] = [
                &[a], &[b], &[c], &[a, b], &[c, a], &[a, b, c], &[c, b, a, a], &[b, b],
                &[a, b, c, a, b], &[c, c, b, b, a, a],
            ];
            for subset in subsets {
                let expected: BTreeSet<usize> = subset
                    .iter()
                    .flat_map(|s| {
                        let k = sets.iter().position(|t| std::ptr::eq(t, *s)).unwrap();
                        model[k].iter().copied()
                    })
                    .collect();
                prop_assert_eq!(union(subset), expected.into_iter().collect::<Vec<_>>());
            }
        }
    }

    fn s_of(op: &Op) -> usize {
        match *op {
            Op::Insert(s, _) | Op::Remove(s, _) => s,
        }
    }
}
