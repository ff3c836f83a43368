//! Allocations whose size a request chooses, made fallible: where `vec![x; n]` aborts the
//! whole process when the allocator refuses (a Python interpreter included), these return
//! [`OutOfMemory`] for the caller to report (in Python, a MemoryError) and carry on.

/// The allocator refused a buffer of `bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate {bytes} bytes")]
pub struct OutOfMemory {
    pub bytes: u64,
}

/// Resizes `buffer` to `len` elements, new ones `value`; on failure `buffer` is unchanged.
pub fn try_resize<T: Clone>(buffer: &mut Vec<T>, len: usize, value: T) -> Result<(), OutOfMemory> {
    buffer
        .try_reserve_exact(len.saturating_sub(buffer.len()))
        .map_err(|_| OutOfMemory {
            bytes: (len as u64).saturating_mul(size_of::<T>() as u64),
        })?;
    buffer.resize(len, value);
    Ok(())
}

/// `vec![value; len]`, or [`OutOfMemory`].
pub fn try_vec<T: Clone>(value: T, len: usize) -> Result<Vec<T>, OutOfMemory> {
    let mut buffer = Vec::new();
    try_resize(&mut buffer, len, value)?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_allocation_is_an_error_naming_its_bytes() {
        // More than the address space holds: refused at once, without touching memory.
        assert_eq!(try_vec(0u64, 1 << 60), Err(OutOfMemory { bytes: 1 << 63 }));
        let mut buffer = vec![1u8; 3];
        assert_eq!(
            try_resize(&mut buffer, usize::MAX, 0),
            Err(OutOfMemory { bytes: u64::MAX })
        );
        assert_eq!(buffer, [1, 1, 1]);
        try_resize(&mut buffer, 5, 0).unwrap();
        assert_eq!(buffer, [1, 1, 1, 0, 0]);
    }
}
