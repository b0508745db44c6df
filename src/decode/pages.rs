//! A host-side page pool for paged KV caches (vLLM's block manager in miniature): pages are
//! handed to sequences as they grow, returned when a sequence ends, and StreamingLLM eviction
//! keeps a sequence's sink tokens and its most recent window, returning the pages between to
//! the pool. The pool keeps the block table and the lengths that [`super::DecodeOptions`] takes.

use crate::error::{AttnError, Result};

/// The pages of a cache `[num_pages, page_size, Hkv, D]` and the sequences that hold them.
#[derive(Clone, Debug)]
pub struct PagePool {
    page_size: usize,
    max_blocks: usize,
    /// Free pages, the next one handed out last.
    free: Vec<u32>,
    /// Per sequence slot: its pages in logical order and its token count; `None` when free.
    seqs: Vec<Option<(Vec<u32>, usize)>>,
}

impl PagePool {
    /// A pool of `num_pages` pages of `page_size` tokens; a sequence may hold up to
    /// `max_blocks` pages (the block table's width).
    pub fn new(num_pages: usize, page_size: usize, max_blocks: usize) -> Result<Self> {
        if num_pages == 0 || page_size == 0 || max_blocks == 0 {
            return Err(AttnError::invalid(
                "page pool",
                "at least one page of at least one token, and max_blocks >= 1",
                format!("{num_pages} pages of {page_size}, max_blocks {max_blocks}"),
            ));
        }
        let pages = u32::try_from(num_pages).map_err(|_| AttnError::Limit {
            what: "pages in a pool".into(),
            needed: num_pages as u64,
            limit: u32::MAX as u64,
        })?;
        if i32::try_from(num_pages).is_err() {
            return Err(AttnError::Limit {
                what: "pages in a pool (the block table is i32)".into(),
                needed: num_pages as u64,
                limit: i32::MAX as u64,
            });
        }
        Ok(PagePool {
            page_size,
            max_blocks,
            free: (0..pages).rev().collect(),
            seqs: Vec::new(),
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// A new, empty sequence; its slot (a row of the block table).
    pub fn add_sequence(&mut self) -> usize {
        match self.seqs.iter().position(Option::is_none) {
            Some(i) => {
                self.seqs[i] = Some((Vec::new(), 0));
                i
            }
            None => {
                self.seqs.push(Some((Vec::new(), 0)));
                self.seqs.len() - 1
            }
        }
    }

    fn seq(&self, s: usize) -> Result<&(Vec<u32>, usize)> {
        self.seqs
            .get(s)
            .and_then(Option::as_ref)
            .ok_or_else(|| AttnError::invalid("sequence", "a sequence of this pool", s))
    }

    /// Tokens sequence `s` holds.
    pub fn len(&self, s: usize) -> Result<usize> {
        Ok(self.seq(s)?.1)
    }

    /// Grows sequence `s` by `n` tokens, taking the pages it needs. Too few free pages, or more
    /// than `max_blocks`, is a typed error and changes nothing.
    pub fn append(&mut self, s: usize, n: usize) -> Result<()> {
        let (pages, len) = self.seq(s)?;
        let new_len = len
            .checked_add(n)
            .ok_or_else(|| AttnError::invalid("append", "a length that fits usize", n))?;
        let need = new_len.div_ceil(self.page_size);
        if need > self.max_blocks {
            return Err(AttnError::Limit {
                what: format!("pages of sequence {s} (the block table's width)"),
                needed: need as u64,
                limit: self.max_blocks as u64,
            });
        }
        let more = need.saturating_sub(pages.len());
        if more > self.free.len() {
            return Err(AttnError::Limit {
                what: format!("free pages for {n} more tokens of sequence {s}"),
                needed: more as u64,
                limit: self.free.len() as u64,
            });
        }
        let at = self.free.len() - more;
        let taken: Vec<u32> = self.free.drain(at..).rev().collect();
        if let Some(Some((pages, len))) = self.seqs.get_mut(s) {
            pages.extend(taken);
            *len = new_len;
        }
        Ok(())
    }

    /// Ends sequence `s`: its pages go back to the pool, its slot to the next new sequence.
    pub fn free_sequence(&mut self, s: usize) -> Result<()> {
        self.seq(s)?;
        if let Some((pages, _)) = self.seqs[s].take() {
            self.free.extend(pages.into_iter().rev());
        }
        Ok(())
    }

    /// StreamingLLM eviction: keeps the pages holding the first `sinks` tokens and those
    /// holding the most recent `window`, returns the whole pages between to the pool and
    /// returns them. The kept pages close up in the block table, so the sequence is then
    /// shorter by the tokens those pages held (pages are evicted whole: a kept page may hold a
    /// few tokens past the sinks or before the window).
    pub fn evict_streaming(&mut self, s: usize, sinks: usize, window: usize) -> Result<Vec<u32>> {
        let p = self.page_size;
        let (_, len) = self.seq(s)?;
        let keep_head = sinks.div_ceil(p);
        let first_recent = len.saturating_sub(window) / p;
        if first_recent <= keep_head {
            return Ok(Vec::new());
        }
        let Some(Some((pages, len))) = self.seqs.get_mut(s) else {
            return Ok(Vec::new());
        };
        let gone: Vec<u32> = pages.drain(keep_head..first_recent).collect();
        *len -= gone.len() * p;
        self.free.extend(gone.iter().rev());
        Ok(gone)
    }

    /// The block table `[sequences, max_blocks]` (row-major i32; unused entries 0: past a
    /// sequence's length nothing is read) and the lengths, for [`super::DecodeOptions`].
    pub fn tables(&self) -> (Vec<i32>, Vec<u32>) {
        let mut table = vec![0i32; self.seqs.len() * self.max_blocks];
        let mut lens = vec![0u32; self.seqs.len()];
        for (i, s) in self.seqs.iter().enumerate() {
            if let Some((pages, len)) = s {
                for (j, &pg) in pages.iter().enumerate() {
                    // pages fit i32: checked in `new`
                    table[i * self.max_blocks + j] = pg as i32;
                }
                lens[i] = u32::try_from(*len).unwrap_or(u32::MAX);
            }
        }
        (table, lens)
    }

    /// Where logical token `j` of sequence `s` lives: `(page, row)`.
    pub fn slot(&self, s: usize, j: usize) -> Result<(u32, usize)> {
        let (pages, len) = self.seq(s)?;
        if j >= *len {
            return Err(AttnError::invalid(
                "token",
                format!("an index below the sequence's length {len}"),
                j,
            ));
        }
        Ok((pages[j / self.page_size], j % self.page_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_taken_returned_and_refused_whole() {
        let mut pool = PagePool::new(6, 4, 4).unwrap();
        let a = pool.add_sequence();
        let b = pool.add_sequence();
        pool.append(a, 5).unwrap(); // 2 pages
        pool.append(b, 4).unwrap(); // 1 page
        assert_eq!(pool.free_pages(), 3);
        // 9 more tokens for b need 3 pages more (13 tokens): fits; 17 would not
        assert!(matches!(pool.append(b, 13), Err(AttnError::Limit { .. })));
        assert_eq!((pool.free_pages(), pool.len(b).unwrap()), (3, 4));
        pool.append(b, 9).unwrap();
        assert_eq!(pool.free_pages(), 0);
        assert!(pool.append(a, 4).is_err());
        let (t, lens) = pool.tables();
        assert_eq!(lens, vec![5, 13]);
        let mut used: Vec<i32> = t[..2].iter().chain(&t[4..8]).copied().collect();
        used.sort();
        assert_eq!(used, vec![0, 1, 2, 3, 4, 5]);
        pool.free_sequence(a).unwrap();
        assert_eq!(pool.free_pages(), 2);
        assert!(pool.len(a).is_err());
        assert_eq!(pool.add_sequence(), a);
        assert!(PagePool::new(0, 4, 4).is_err());
    }

    #[test]
    fn streaming_eviction_keeps_sinks_and_the_window() {
        let mut pool = PagePool::new(16, 4, 16).unwrap();
        let s = pool.add_sequence();
        pool.append(s, 30).unwrap(); // pages 0..8, the last holding 2
        let before: Vec<u32> = (0..30).map(|j| pool.slot(s, j).unwrap().0).collect();
        let gone = pool.evict_streaming(s, 4, 8).unwrap();
        // keeps page 0 (sinks 0..4) and the pages of tokens 22..30 (pages 5, 6, 7)
        assert_eq!(gone.len(), 4);
        assert_eq!(pool.len(s).unwrap(), 30 - 16);
        assert_eq!(pool.slot(s, 0).unwrap().0, before[0]);
        assert_eq!(pool.slot(s, 4).unwrap().0, before[20]);
        assert_eq!(pool.slot(s, 13).unwrap(), (before[29], 1));
        assert_eq!(pool.free_pages(), 16 - 8 + 4);
        // nothing between: nothing to evict
        assert!(pool.evict_streaming(s, 4, 100).unwrap().is_empty());
    }
}
