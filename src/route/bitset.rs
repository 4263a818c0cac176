//! A growable bit set over slab indices.

#[derive(Debug, Clone, Default)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    /// Sets bit `i`; returns true if it was clear.
    pub fn insert(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, i % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        self.len += !was as usize;
        !was
    }

    /// Clears bit `i`; returns true if it was set.
    pub fn remove(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, i % 64);
        let Some(word) = self.words.get_mut(w) else {
            return false;
        };
        let was = *word & (1 << b) != 0;
        *word &= !(1 << b);
        self.len -= was as usize;
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
        was
    }

    pub fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// Calls `f` once for every bit set in any of `sets` (their union), in increasing order.
pub fn for_each_in_union(sets: &[&BitSet], mut f: impl FnMut(usize)) {
    let n = sets.iter().map(|s| s.words.len()).max().unwrap_or(0);
    for w in 0..n {
        let mut word = sets
            .iter()
            .fold(0u64, |acc, s| acc | s.words.get(w).copied().unwrap_or(0));
        while word != 0 {
            let b = word.trailing_zeros() as usize;
            f(w * 64 + b);
            word &= word - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_union() {
        let mut a = BitSet::default();
        let mut b = BitSet::default();
        assert!(a.insert(3) && a.insert(200) && !a.insert(3));
        assert!(b.insert(3) && b.insert(64));
        assert_eq!(a.len(), 2);
        let mut seen = Vec::new();
        for_each_in_union(&[&a, &b], |i| seen.push(i));
        assert_eq!(seen, vec![3, 64, 200]);
        assert!(a.remove(200) && !a.remove(200));
        assert_eq!(a.words().len(), 1);
        assert!(a.contains(3) && !a.contains(200));
    }
}
