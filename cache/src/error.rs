//! The crate's error type.

/// Everything a cache operation can fail with.
#[derive(thiserror::Error, Debug)]
pub enum CacheError {
    /// A tier file or the backing store failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A configuration (at construction or in a reconfiguration) breaks a rule.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A byte range does not fit inside one chunk, or the chunk number is
    /// the reserved empty-entry tag (`u64::MAX`).
    #[error(
        "out of range: chunk {chunk}, offset {offset}, length {len} (chunk size {chunk_size})"
    )]
    OutOfRange {
        /// The chunk that was addressed.
        chunk: u64,
        /// Byte offset inside the chunk.
        offset: usize,
        /// Length of the requested range.
        len: usize,
        /// The cache's chunk size.
        chunk_size: usize,
    },
    /// A detached stack ([`crate::CacheStack::detached`]) does not hold the
    /// chunk, and has no backing store to fill it from.
    #[error("chunk {chunk} is not cached")]
    NotCached {
        /// The chunk that was looked up.
        chunk: u64,
    },
    /// A reconfiguration named a tier position that does not exist.
    #[error("tier index {index} out of range (the stack has {tiers} tiers)")]
    BadTierIndex {
        /// The index that was given.
        index: usize,
        /// How many tiers the stack had at the time.
        tiers: usize,
    },
}
