//! The backing store the cache sits in front of.

/// The slow, authoritative store behind the cache (the shared volume).
///
/// Every method but `write_range` is called with whole chunks. Calls for one chunk are serialised by the
/// cache (at most one `read_chunk`/`write_chunk`/`zero_chunk` per chunk in
/// flight at a time), calls for different chunks may run concurrently.
pub trait Backing: Send + Sync + 'static {
    /// Fill `buf` (len == chunk_size) with the chunk's content (zeros past the end are the backing's business).
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Write a whole chunk. Not durable until `sync`.
    fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()>;
    /// Make all completed write_chunk/zero_chunk calls durable (fdatasync).
    fn sync(&self) -> std::io::Result<()>;
    /// Make the whole chunk read back as zeros (discard).
    fn zero_chunk(&self, chunk: u64) -> std::io::Result<()>;

    /// Write `data` at byte `offset` inside `chunk` (write-through of part of
    /// a chunk). Not durable until `sync`.
    ///
    /// `scratch` is a chunk-sized buffer the default implementation uses to
    /// read the chunk, patch it and write it whole. A store that can write a
    /// byte range in place (a file) should override this and ignore
    /// `scratch`, avoiding the read and the write amplification. The cache
    /// calls it with the chunk's lock held, so the read-modify-write cannot
    /// race another writer of the same chunk.
    fn write_range(
        &self,
        chunk: u64,
        offset: usize,
        data: &[u8],
        scratch: &mut [u8],
    ) -> std::io::Result<()> {
        self.read_chunk(chunk, scratch)?;
        let end = offset + data.len();
        match scratch.get_mut(offset..end) {
            Some(dst) => dst.copy_from_slice(data),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "write_range outside the chunk",
                ))
            }
        }
        self.write_chunk(chunk, scratch)
    }
}

/// A backing shared behind an `Arc` is a backing: the root's node holds
/// its origin this way while its driver reads the same store by itself.
/// Every method forwards, `write_range` too, so a store that writes
/// ranges in place keeps doing so.
impl<B: Backing + ?Sized> Backing for std::sync::Arc<B> {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()> {
        (**self).read_chunk(chunk, buf)
    }
    fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()> {
        (**self).write_chunk(chunk, data)
    }
    fn sync(&self) -> std::io::Result<()> {
        (**self).sync()
    }
    fn zero_chunk(&self, chunk: u64) -> std::io::Result<()> {
        (**self).zero_chunk(chunk)
    }
    fn write_range(
        &self,
        chunk: u64,
        offset: usize,
        data: &[u8],
        scratch: &mut [u8],
    ) -> std::io::Result<()> {
        (**self).write_range(chunk, offset, data, scratch)
    }
}
