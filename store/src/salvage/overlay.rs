//! A copy-on-write view of a damaged database file: reads come from the
//! file, writes stay in memory. redb writes when it opens a file that was
//! not closed cleanly (it repairs it and commits the repair); salvage has
//! to read such a file without changing a byte of it, since the damaged
//! file is kept for forensics.
//!
//! Invariant: nothing is ever written to `base`; a page written once is
//! read from memory from then on.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use redb::StorageBackend;

/// Granularity of the copies kept in memory.
const PAGE: u64 = 4096;

#[derive(Debug)]
pub(crate) struct Overlay {
    base: Box<dyn StorageBackend>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The length redb sees (it may grow the file while repairing).
    len: u64,
    /// Length of `base`: bytes past it read as zeros.
    base_len: u64,
    /// Pages written, by page number.
    pages: HashMap<u64, Vec<u8>>,
}

impl Overlay {
    pub(crate) fn new(base: Box<dyn StorageBackend>) -> io::Result<Overlay> {
        let len = base.len()?;
        Ok(Overlay {
            base,
            state: Mutex::new(State {
                len,
                base_len: len,
                pages: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fills `out` from the base file at `offset`, zeros past its end.
    fn read_base(&self, base_len: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let available = base_len.saturating_sub(offset).min(out.len() as u64) as usize;
        if available > 0 {
            self.base.read(offset, &mut out[..available])?;
        }
        out[available..].fill(0);
        Ok(())
    }
}

impl StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.lock();
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(out.len() - done);
            let chunk = &mut out[done..done + n];
            match state.pages.get(&page) {
                Some(bytes) => chunk.copy_from_slice(&bytes[within..within + n]),
                None => self.read_base(state.base_len, at, chunk)?,
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - done);
            if !state.pages.contains_key(&page) {
                let mut copy = vec![0u8; PAGE as usize];
                self.read_base(state.base_len, page * PAGE, &mut copy)?;
                state.pages.insert(page, copy);
            }
            if let Some(bytes) = state.pages.get_mut(&page) {
                bytes[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            done += n;
        }
        state.len = state.len.max(offset + data.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Mutex<Vec<u8>>);

    impl StorageBackend for Fixed {
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let bytes = self.0.lock().unwrap();
            out.copy_from_slice(&bytes[offset as usize..offset as usize + out.len()]);
            Ok(())
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            panic!("the base is never resized")
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
            panic!("the base is never written")
        }
    }

    #[test]
    fn writes_stay_in_memory_and_read_back_across_pages() {
        let base: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        let overlay = Overlay::new(Box::new(Fixed(Mutex::new(base.clone())))).unwrap();
        overlay.write(PAGE - 2, &[0xEE; 4]).unwrap();
        overlay.write(4 * PAGE, &[0xDD; 2]).unwrap();
        assert_eq!(overlay.len().unwrap(), 4 * PAGE + 2);

        let mut out = vec![0u8; 8];
        overlay.read(PAGE - 4, &mut out).unwrap();
        assert_eq!(out[..2], base[PAGE as usize - 4..PAGE as usize - 2]);
        assert_eq!(out[2..6], [0xEE; 4]);
        assert_eq!(out[6..], base[PAGE as usize + 2..PAGE as usize + 4]);

        let mut tail = vec![1u8; 4];
        overlay.read(4 * PAGE - 2, &mut tail).unwrap();
        assert_eq!(
            tail,
            [0, 0, 0xDD, 0xDD],
            "past the base: zeros, then the write"
        );
    }
}
