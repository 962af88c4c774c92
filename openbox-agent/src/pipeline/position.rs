//! How far the agent has read the ring buffer, against what the kernel programs have
//! reserved in it: the proof the daemon needs before it ends an activity.
//!
//! A kernel program reserves a slot (the producer position moves on, under the ring's
//! lock) and commits it later; the reader stops at the first slot still reserved, so a
//! record committed behind it waits. A record reserved before a worker sent a hook
//! message is below the producer position read after that message arrived (the send
//! and the receive order the two), whichever CPU wrote it. Once the reader's position
//! (the consumer position, which the reader publishes after every record, discarded
//! ones included) has passed that mark, every such record has been read.
//!
//! Both positions are read from the ring's own meta pages, mapped a second time
//! read-only (the kernel allows read-only mappings of any part of a ring buffer).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{anyhow, Result};

/// A producer position: every record reserved in the ring so far lies below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(pub usize);

/// Whether the reader has read every record reserved before a mark.
pub trait RingOrder {
    /// Everything reserved in the ring up to now lies below this mark.
    fn mark(&self) -> Mark;
    /// Every record below `mark` has been read.
    fn read_past(&self, mark: Mark) -> bool;
}

/// Positions are byte counts that only grow; they wrap around at `usize::MAX`, so they
/// are compared by their difference.
pub fn reached(consumer: usize, mark: Mark) -> bool {
    consumer.wrapping_sub(mark.0) as isize >= 0
}

/// The ring's consumer and producer positions, each the first word of its meta page.
pub struct Positions {
    consumer: Page,
    producer: Page,
}

// SAFETY: the pages are read-only mappings of kernel memory read with atomic loads.
unsafe impl Send for Positions {}
// SAFETY: as above; shared between the session and the ring's drain thread.
unsafe impl Sync for Positions {}

struct Page {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Page {
    fn map(fd: &impl AsFd, index: usize) -> Result<Page> {
        // SAFETY: sysconf has no preconditions.
        let len = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| anyhow!("the page size is unknown"))?;
        let offset = libc::off_t::try_from(index * len)?;
        // SAFETY: a fresh read-only shared mapping of the map's descriptor; the kernel
        // checks the offset and length against the ring's pages.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping page {index} of the ring buffer read-only: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(ptr).ok_or_else(|| anyhow!("mmap returned null"))?;
        Ok(Page { ptr, len })
    }

    fn position(&self) -> usize {
        // SAFETY: the page is mapped for as long as `self` lives and starts with the
        // position, an unsigned long the kernel (producer) or the reader (consumer)
        // stores with release semantics; acquire pairs with it.
        unsafe { self.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

impl Positions {
    /// Maps the consumer page (the ring's first) and the producer page (its second).
    pub fn new(ring: &impl AsFd) -> Result<Positions> {
        Ok(Positions {
            consumer: Page::map(ring, 0)?,
            producer: Page::map(ring, 1)?,
        })
    }

    pub fn consumer(&self) -> usize {
        self.consumer.position()
    }

    pub fn producer(&self) -> usize {
        self.producer.position()
    }
}

impl RingOrder for Positions {
    fn mark(&self) -> Mark {
        Mark(self.producer())
    }

    fn read_past(&self, mark: Mark) -> bool {
        reached(self.consumer(), mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_compare_across_the_wrap() {
        assert!(reached(10, Mark(10)));
        assert!(reached(11, Mark(10)));
        assert!(!reached(9, Mark(10)));
        assert!(reached(3, Mark(usize::MAX - 4)));
        assert!(!reached(usize::MAX - 4, Mark(3)));
    }
}
