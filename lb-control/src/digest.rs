//! One digest for everything that must compare equal across nodes and runs:
//! FNV-1a 64 (config texts, plan documents, Maglev tables, probe jitter).
//! It is not a cryptographic hash; it names contents, it does not prove them.

/// FNV-1a 64 offset basis.
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// An incremental FNV-1a 64 hasher, for inputs that come in pieces.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(OFFSET)
    }
}

impl Fnv1a {
    /// Feeds `bytes`.
    #[must_use]
    pub fn update(self, bytes: &[u8]) -> Self {
        Self(
            bytes
                .iter()
                .fold(self.0, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME)),
        )
    }

    /// The digest of everything fed so far.
    pub const fn finish(self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    Fnv1a::default().update(bytes).finish()
}

/// The digest of a text (config digests, plan digests).
pub fn text_digest(text: &str) -> u64 {
    fnv1a(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_64_vectors() {
        // Test vectors from the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let whole = fnv1a(b"hello world");
        let pieces = Fnv1a::default().update(b"hello").update(b" world").finish();
        assert_eq!(whole, pieces);
        assert_eq!(text_digest("hello world"), whole);
    }
}
