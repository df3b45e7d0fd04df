//! Client-side encryption of backup objects with age (X25519 recipients).
//!
//! With `backup.encryption.age-recipients`, the uploader seals each object's
//! records into one age stream, stored as a single frame of the object (a
//! big-endian `u64` length, then the age file), so compaction can still join
//! objects by concatenating frames without the key. Readers tell a sealed
//! frame from an LTX record by its first bytes (`age-encryption.org/` against
//! `LTX1`) and open it with the identities given (`--age-identity FILE`, or
//! `backup.encryption.age-identity-file`). Object names, sizes, TXIDs and
//! checksums stay visible; the pages do not.
//!
//! Invariants: the SHA-256 in an object's name is that of the stored
//! (sealed) bytes, so `backup verify` checks integrity without the key; a
//! frame that no identity opens is an error naming the object, never skipped.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The first bytes of every age file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/";

/// What can go wrong with keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A recipient is not an age X25519 public key.
    #[error(
        "backup.encryption.age-recipients[{index}] is not an age X25519 public key (age1...): {reason}"
    )]
    BadRecipient {
        /// Its position in the list.
        index: usize,
        /// The parser's word.
        reason: String,
    },
    /// The identity file cannot be read or holds no usable identity.
    #[error("age identity file {path}: {reason}")]
    BadIdentityFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The public keys objects are sealed to.
#[derive(Clone)]
pub struct Recipients(Arc<Vec<age::x25519::Recipient>>);

impl std::fmt::Debug for Recipients {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Recipients({})", self.0.len())
    }
}

impl Recipients {
    /// Parses `backup.encryption.age-recipients`.
    pub fn parse(keys: &[String]) -> Result<Recipients, KeyError> {
        keys.iter()
            .enumerate()
            .map(|(index, key)| {
                key.trim()
                    .parse::<age::x25519::Recipient>()
                    .map_err(|reason| KeyError::BadRecipient {
                        index,
                        reason: reason.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|recipients| Recipients(Arc::new(recipients)))
    }

    /// Seals everything `plain` yields into one age file written to `out`.
    pub fn seal(&self, plain: &mut dyn Read, out: &mut dyn Write) -> io::Result<()> {
        let encryptor = age::Encryptor::with_recipients(
            self.0
                .iter()
                .map(|recipient| recipient as &dyn age::Recipient),
        )
        .map_err(io::Error::other)?;
        let mut writer = encryptor.wrap_output(out)?;
        io::copy(plain, &mut writer)?;
        writer.finish()?;
        Ok(())
    }
}

/// The private keys sealed objects are opened with.
#[derive(Clone)]
pub struct Identities(Arc<Vec<Box<dyn age::Identity + Send + Sync>>>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Identities({})", self.0.len())
    }
}

impl Identities {
    /// Reads an age identity file (`AGE-SECRET-KEY-1...` lines).
    pub fn from_file(path: &Path) -> Result<Identities, KeyError> {
        let error = |reason: String| KeyError::BadIdentityFile {
            path: path.display().to_string(),
            reason,
        };
        let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
            .map_err(|error_| error(error_.to_string()))?;
        let identities = file
            .into_identities()
            .map_err(|error_| error(error_.to_string()))?;
        if identities.is_empty() {
            return Err(error("it holds no identity".into()));
        }
        Ok(Identities(Arc::new(identities)))
    }

    /// Opens the age file `sealed` into `out`; the error says why in words.
    pub fn open(&self, sealed: &mut dyn Read, out: &mut dyn Write) -> Result<(), String> {
        let decryptor = age::Decryptor::new(sealed).map_err(|error| error.to_string())?;
        let mut reader = decryptor
            .decrypt(
                self.0
                    .iter()
                    .map(|identity| identity.as_ref() as &dyn age::Identity),
            )
            .map_err(|error| match error {
                age::DecryptError::NoMatchingKeys => {
                    "none of the given age identities can open it (wrong key?)".to_string()
                }
                error => error.to_string(),
            })?;
        io::copy(&mut reader, out).map_err(|error| error.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn sealed_bytes_open_with_the_identity_only() {
        let identity = age::x25519::Identity::generate();
        let recipients = Recipients::parse(&[identity.to_public().to_string()]).unwrap();
        let mut sealed = Vec::new();
        recipients
            .seal(&mut &b"LTX1 pages"[..], &mut sealed)
            .unwrap();
        assert!(sealed.starts_with(AGE_MAGIC));
        assert!(!sealed.windows(10).any(|window| window == b"LTX1 pages"));

        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key.txt");
        std::fs::write(&key_file, identity.to_string().expose_secret()).unwrap();
        let identities = Identities::from_file(&key_file).unwrap();
        let mut plain = Vec::new();
        identities.open(&mut &sealed[..], &mut plain).unwrap();
        assert_eq!(plain, b"LTX1 pages");

        let other = dir.path().join("other.txt");
        let stranger = age::x25519::Identity::generate();
        std::fs::write(&other, stranger.to_string().expose_secret()).unwrap();
        let error = Identities::from_file(&other)
            .unwrap()
            .open(&mut &sealed[..], &mut Vec::new())
            .unwrap_err();
        assert!(error.contains("wrong key"), "{error}");
        assert!(matches!(
            Recipients::parse(&["age1nope".into()]),
            Err(KeyError::BadRecipient { index: 0, .. })
        ));
    }
}
