//! Key material: the master key, its sealing, subject data keys, and the
//! signing key.
//!
//! ```text
//! passphrase --argon2id(salt, m, t, p)--> KEK --seal--> master key (32 B)
//! key file (32 B) ------------------------> KEK --seal--> master key
//! master key --wrap(AAD = subject, version)--> subject data key (32 B)
//! master key --wrap(AAD = key id)-----------> ed25519 signing key
//! ```
//!
//! Every seal and wrap is AES-256-GCM-SIV with a 96-bit nonce and
//! associated data that names what is sealed, so a wrapped key moved to
//! another subject or version fails to unwrap. Key sealing and wrapping
//! take nonces from the OS; records take them from a [`NonceSource`]. Key material lives in
//! [`zeroize::Zeroizing`] buffers and no type here prints a secret.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use zeroize::{Zeroize, Zeroizing};

use crate::entry::Reader;
use crate::error::{Error, Result};

/// Argon2id memory floor (KiB): OWASP's minimum for argon2id, and the crate default.
pub const KDF_MIN_M_KIB: u32 = 19 * 1024;
/// Argon2id iteration floor.
pub const KDF_MIN_T: u32 = 2;
/// Argon2id lanes floor.
pub const KDF_MIN_P: u32 = 1;
/// Ceilings, so that a tampered store cannot make opening take unbounded
/// memory or time: 4 GiB, 64 iterations, 64 lanes.
pub const KDF_MAX_M_KIB: u32 = 4 * 1024 * 1024;
/// Argon2id iteration ceiling.
pub const KDF_MAX_T: u32 = 64;
/// Argon2id lanes ceiling.
pub const KDF_MAX_P: u32 = 64;

/// Fills `buf` with random bytes from the OS.
pub fn random_bytes(buf: &mut [u8]) {
    // getrandom only fails when the OS has no entropy source at all; a vault
    // must not run on such a machine.
    getrandom::getrandom(buf).expect("the operating system's random source failed");
}

/// A fresh random nonce.
pub fn random_nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    random_bytes(&mut n);
    n
}

/// A 256-bit symmetric key, wiped on drop.
#[derive(Clone, Zeroize, zeroize::ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        random_bytes(&mut k);
        SecretKey(k)
    }
    /// Wraps raw bytes (the caller's copy should be zeroized).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    fn cipher(&self) -> Aes256GcmSiv {
        Aes256GcmSiv::new((&self.0).into())
    }

    /// The expanded cipher, for encrypting many messages under this key.
    pub fn cipher_handle(&self) -> Cipher {
        Cipher(Box::new(self.cipher()))
    }

    /// Encrypts `msg` with associated data `aad` under a fresh nonce.
    pub fn seal(&self, aad: &[u8], msg: &[u8]) -> ([u8; 12], Vec<u8>) {
        let nonce = random_nonce();
        (nonce, self.seal_with_nonce(&nonce, aad, msg))
    }

    /// Encrypts with a given nonce (AES-GCM-SIV stays safe on nonce reuse,
    /// leaking only equality of identical messages).
    pub fn seal_with_nonce(&self, nonce: &[u8; 12], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        self.cipher()
            .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
            // Encryption fails only for inputs over 2^36 bytes, far beyond MAX_PAYLOAD_LEN.
            .expect("AES-GCM-SIV encryption of a bounded message")
    }

    /// Decrypts, or `None` when the key, nonce, AAD or ciphertext is wrong.
    pub fn open(&self, nonce: &[u8; 12], aad: &[u8], ct: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
            .map(Zeroizing::new)
    }
}

/// An expanded AES-256-GCM-SIV key (the `aes` crate wipes its key
/// schedule on drop). Saves the key expansion per message on hot paths.
/// Boxed, so that moving a `Cipher` (in and out of a cache's table, say,
/// or as the table grows) moves a pointer and leaves no copy of the key
/// schedule behind; the schedule is wiped where it lives when dropped.
/// (Building it may leave a copy on the stack, as any key expansion may:
/// this keeps copies few, it does not scrub memory.)
#[derive(Clone)]
pub struct Cipher(Box<Aes256GcmSiv>);

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    /// Encrypts `msg` with `aad` under `nonce`.
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        self.0
            .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
            // Encryption fails only for inputs over 2^36 bytes, far beyond MAX_PAYLOAD_LEN.
            .expect("AES-GCM-SIV encryption of a bounded message")
    }
}

/// Nonces for the committer without a system call each: BLAKE3 keyed with
/// a fresh random key per process, over a counter: pseudo-random 96-bit
/// values, distinct with the probability of random ones (under 2^-33 for
/// the 2^32 records one data key may encrypt).
/// (AES-GCM-SIV would stay safe even on a repeat, leaking only equality of
/// identical plaintexts.)
pub struct NonceSource {
    key: zeroize::Zeroizing<[u8; 32]>,
    counter: u64,
}

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceSource(..)")
    }
}

impl Default for NonceSource {
    fn default() -> Self {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        random_bytes(key.as_mut());
        NonceSource { key, counter: 0 }
    }
}

impl NonceSource {
    /// The next nonce.
    pub fn next_nonce(&mut self) -> [u8; 12] {
        self.counter += 1;
        let h = blake3::keyed_hash(&self.key, &self.counter.to_le_bytes());
        let mut n = [0u8; 12];
        n.copy_from_slice(&h.as_bytes()[..12]);
        n
    }
}

/// How the master key is unsealed.
pub enum Unlock {
    /// An operator passphrase, stretched with argon2id.
    Passphrase(Zeroizing<Vec<u8>>),
    /// A 32-byte key file, used as the key-encryption key directly.
    KeyFile(SecretKey),
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unlock::Passphrase(_) => f.write_str("Unlock::Passphrase(..)"),
            Unlock::KeyFile(_) => f.write_str("Unlock::KeyFile(..)"),
        }
    }
}

impl Unlock {
    /// A passphrase from bytes; a trailing newline (as `echo` writes) is dropped.
    pub fn passphrase(bytes: impl Into<Vec<u8>>) -> Self {
        let mut v = Zeroizing::new(bytes.into());
        while matches!(v.last(), Some(b'\n' | b'\r')) {
            v.pop();
        }
        Unlock::Passphrase(v)
    }

    /// A key file's content: exactly 32 raw bytes, or 64 hex digits.
    ///
    /// 32 bytes of printable text (with or without a line end) are refused: a
    /// key file is used as the key, without argon2id, so a phrase of 32
    /// characters given as one would be a weak key; 32 random bytes are
    /// all printable with a chance of about 10^-14. A passphrase goes in a
    /// passphrase file.
    pub fn key_file(content: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(content).map(str::trim).unwrap_or("");
        // Wiped on every path, a hex decode that failed midway included.
        let mut key = Zeroizing::new([0u8; 32]);
        // Printable, but for the line end a text file's last line has: 32
        // random bytes are that with a chance of about 10^-14.
        let line = content.strip_suffix(b"\n").unwrap_or(content);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let looks_like_text = line.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
        if content.len() == 32 && !looks_like_text {
            key.copy_from_slice(content);
        } else if text.len() == 64 && hex::decode_to_slice(text, key.as_mut()).is_ok() {
        } else if content.len() == 32 {
            return Err(Error::Invalid(
                "a key file holds 32 raw bytes or 64 hex digits, and these 32 bytes are text: \
                 a phrase goes in a passphrase file (argon2id stretches it), a key file holds \
                 random bytes"
                    .into(),
            ));
        } else {
            return Err(Error::Invalid(
                "a key file holds 32 raw bytes or 64 hex digits".into(),
            ));
        }
        Ok(Unlock::KeyFile(SecretKey::from_bytes(*key)))
    }
}

/// Argon2id parameters, stored beside the sealed master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl KdfParams {
    /// These settings, raised field by field to `other`'s where those are
    /// higher (`None`: as they are).
    pub fn at_least(self, other: Option<KdfParams>) -> KdfParams {
        match other {
            None => self,
            Some(o) => KdfParams {
                m_kib: self.m_kib.max(o.m_kib),
                t: self.t.max(o.t),
                p: self.p.max(o.p),
            },
        }
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_kib: KDF_MIN_M_KIB,
            t: KDF_MIN_T,
            p: KDF_MIN_P,
        }
    }
}

impl KdfParams {
    /// What a key-file sealing stores in the parameters' place.
    pub const NONE: KdfParams = KdfParams {
        m_kib: 0,
        t: 0,
        p: 0,
    };

    /// Refuses parameters below the floor or above the ceiling (a tampered
    /// or careless store).
    pub fn check_floor(&self) -> Result<()> {
        if self.m_kib > KDF_MAX_M_KIB || self.t > KDF_MAX_T || self.p > KDF_MAX_P {
            return Err(Error::WeakKdf(format!(
                "m={} KiB t={} p={} above the ceiling (m={KDF_MAX_M_KIB} t={KDF_MAX_T} p={KDF_MAX_P})",
                self.m_kib, self.t, self.p
            )));
        }
        if self.m_kib < KDF_MIN_M_KIB || self.t < KDF_MIN_T || self.p < KDF_MIN_P {
            return Err(Error::WeakKdf(format!(
                "m={} KiB t={} p={} (floor m={KDF_MIN_M_KIB} t={KDF_MIN_T} p={KDF_MIN_P})",
                self.m_kib, self.t, self.p
            )));
        }
        Ok(())
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8; 16]) -> Result<SecretKey> {
        self.check_floor()?;
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| Error::WeakKdf(e.to_string()))?;
        // The working memory, wiped when dropped: its last block is all
        // the KEK takes to recompute (with p = 1), and `hash_password_into`
        // frees its own unwiped.
        let mut memory = Zeroizing::new(vec![argon2::Block::default(); params.block_count()]);
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        a.hash_password_into_with_memory(passphrase, salt, &mut out, memory.as_mut_slice())
            .map_err(|e| Error::WeakKdf(e.to_string()))?;
        let k = SecretKey::from_bytes(out);
        out.zeroize();
        Ok(k)
    }
}

/// The master key sealed under a passphrase or key file.
///
/// ```text
/// 0   1  version = 1
/// 1   1  kdf: 1 = argon2id passphrase, 2 = key file
/// 2   4  m_kib   (argon2id; 0 for key file)
/// 6   4  t
/// 10  4  p
/// 14 16  salt
/// 30 12  nonce
/// 42 48  AES-256-GCM-SIV(KEK, nonce, master key, AAD = "fintrust-vault/master/v1\0" || vault_id)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedMaster {
    pub kdf: Option<KdfParams>,
    pub salt: [u8; 16],
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

const MASTER_AAD: &[u8] = b"fintrust-vault/master/v1\0";
/// Length of an encoded [`SealedMaster`].
pub const SEALED_MASTER_LEN: usize = 90;

impl SealedMaster {
    /// Seals `master` for vault `vault_id` under `unlock`.
    pub fn seal(
        master: &SecretKey,
        unlock: &Unlock,
        kdf: KdfParams,
        vault_id: &[u8; 16],
    ) -> Result<Self> {
        let mut salt = [0u8; 16];
        random_bytes(&mut salt);
        let (kek, kdf) = match unlock {
            // Whatever calls the library: a vault is never sealed by nothing.
            Unlock::Passphrase(p) if p.is_empty() => {
                return Err(Error::Invalid("an empty passphrase seals nothing".into()))
            }
            Unlock::Passphrase(p) => (kdf.derive(p, &salt)?, Some(kdf)),
            Unlock::KeyFile(k) => (k.clone(), None),
        };
        let (nonce, ciphertext) = kek.seal(&master_aad(vault_id), master.as_bytes());
        Ok(SealedMaster {
            kdf,
            salt,
            nonce,
            ciphertext,
        })
    }

    /// Unseals the master key, or `WrongSecret`.
    pub fn unseal(&self, unlock: &Unlock, vault_id: &[u8; 16]) -> Result<SecretKey> {
        let kek = match (unlock, &self.kdf) {
            (Unlock::Passphrase(p), Some(kdf)) => kdf.derive(p, &self.salt)?,
            (Unlock::KeyFile(k), None) => k.clone(),
            (Unlock::Passphrase(_), None) => {
                return Err(Error::Invalid(
                    "this vault is sealed with a key file, not a passphrase".into(),
                ))
            }
            (Unlock::KeyFile(_), Some(_)) => {
                return Err(Error::Invalid(
                    "this vault is sealed with a passphrase, not a key file".into(),
                ))
            }
        };
        let pt = kek
            .open(&self.nonce, &master_aad(vault_id), &self.ciphertext)
            .ok_or(Error::WrongSecret)?;
        let mut bytes: [u8; 32] = pt.as_slice().try_into().map_err(|_| Error::WrongSecret)?;
        let master = SecretKey::from_bytes(bytes);
        bytes.zeroize();
        Ok(master)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEALED_MASTER_LEN);
        out.push(1);
        let (kind, p) = match self.kdf {
            Some(p) => (1u8, p),
            None => (2u8, KdfParams::NONE),
        };
        out.push(kind);
        out.extend_from_slice(&p.m_kib.to_be_bytes());
        out.extend_from_slice(&p.t.to_be_bytes());
        out.extend_from_slice(&p.p.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        if r.u8()? != 1 {
            return Err(Error::Malformed("unknown sealed master version"));
        }
        let kind = r.u8()?;
        let params = KdfParams {
            m_kib: r.u32()?,
            t: r.u32()?,
            p: r.u32()?,
        };
        let kdf = match kind {
            1 => Some(params),
            // A key file derives nothing: its parameters are written as
            // zeros, so that one sealed key has one encoding.
            2 if params == KdfParams::NONE => None,
            2 => return Err(Error::Malformed("key-file sealing with kdf parameters")),
            _ => return Err(Error::Malformed("unknown kdf kind")),
        };
        let salt = r.array()?;
        let nonce = r.array()?;
        let ct = r.take(48)?.to_vec();
        if !r.is_empty() {
            return Err(Error::Malformed("trailing bytes after sealed master"));
        }
        Ok(SealedMaster {
            kdf,
            salt,
            nonce,
            ciphertext: ct,
        })
    }
}

fn master_aad(vault_id: &[u8; 16]) -> Vec<u8> {
    [MASTER_AAD, vault_id.as_slice()].concat()
}

/// A key wrapped under the master key: `nonce (12) || ciphertext (32 + 16 tag)`.
pub const WRAPPED_LEN: usize = 60;

/// AAD binding a subject data key to its subject and version.
pub fn data_key_aad(subject: &str, version: u32) -> Vec<u8> {
    let mut aad = b"fintrust-vault/data-key/v1\0".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(subject.as_bytes());
    aad
}

/// AAD binding the signing key to its key id.
pub fn signing_key_aad(key_id: u32) -> Vec<u8> {
    let mut aad = b"fintrust-vault/signing-key/v1\0".to_vec();
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

/// AAD of the wrapped masking secret (`keys/"mask"`).
pub fn mask_key_aad() -> Vec<u8> {
    b"fintrust-vault/mask-key/v1\0".to_vec()
}

/// AAD binding a record's ciphertext to its subject, position and key version.
pub fn record_aad(subject: &str, seq: u64, key_version: u32) -> Vec<u8> {
    const TAG: &[u8] = b"fintrust-vault/record/v1\0";
    let mut aad = Vec::with_capacity(TAG.len() + 12 + subject.len());
    aad.extend_from_slice(TAG);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad.extend_from_slice(subject.as_bytes());
    aad
}

/// Wraps a 32-byte key under `master` with `aad`.
pub fn wrap(master: &SecretKey, aad: &[u8], key: &[u8; 32]) -> Vec<u8> {
    let (nonce, ct) = master.seal(aad, key);
    [nonce.as_slice(), &ct].concat()
}

/// Unwraps what [`wrap`] made; `None` when anything is wrong.
pub fn unwrap_key(master: &SecretKey, aad: &[u8], wrapped: &[u8]) -> Option<SecretKey> {
    if wrapped.len() != WRAPPED_LEN {
        return None;
    }
    let nonce: [u8; 12] = wrapped[..12].try_into().ok()?;
    let pt = master.open(&nonce, aad, &wrapped[12..])?;
    let mut bytes: [u8; 32] = pt.as_slice().try_into().ok()?;
    let key = SecretKey::from_bytes(bytes);
    bytes.zeroize();
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_seal_round_trip_and_wrong_passphrase() {
        let master = SecretKey::generate();
        let id = [7u8; 16];
        let unlock = Unlock::passphrase(b"correct horse\n".to_vec());
        let sealed = SealedMaster::seal(&master, &unlock, KdfParams::default(), &id).expect("seal");
        let enc = sealed.encode();
        assert_eq!(enc.len(), SEALED_MASTER_LEN);
        let dec = SealedMaster::decode(&enc).expect("decode");
        assert_eq!(dec, sealed);
        let back = dec
            .unseal(&Unlock::passphrase(b"correct horse".to_vec()), &id)
            .expect("unseal");
        assert_eq!(back.as_bytes(), master.as_bytes());
        assert!(matches!(
            dec.unseal(&Unlock::passphrase(b"wrong".to_vec()), &id),
            Err(Error::WrongSecret)
        ));
        assert!(matches!(
            dec.unseal(&unlock, &[8u8; 16]),
            Err(Error::WrongSecret)
        ));
        for n in 0..enc.len() {
            assert!(SealedMaster::decode(&enc[..n]).is_err());
        }
    }

    #[test]
    fn weak_kdf_refused() {
        let weak = KdfParams {
            m_kib: 1024,
            t: 1,
            p: 1,
        };
        assert!(matches!(weak.check_floor(), Err(Error::WeakKdf(_))));
        let master = SecretKey::generate();
        let r = SealedMaster::seal(&master, &Unlock::passphrase(b"x".to_vec()), weak, &[0; 16]);
        assert!(matches!(r, Err(Error::WeakKdf(_))));
        // A passphrase that is only a newline is empty once read.
        let r = SealedMaster::seal(
            &master,
            &Unlock::passphrase(b"\n".to_vec()),
            KdfParams::default(),
            &[0; 16],
        );
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }

    #[test]
    fn key_file_round_trip() {
        let kf = Unlock::key_file(hex::encode([3u8; 32]).as_bytes()).expect("hex key file");
        let master = SecretKey::generate();
        let sealed =
            SealedMaster::seal(&master, &kf, KdfParams::default(), &[1; 16]).expect("seal");
        assert!(sealed.kdf.is_none());
        let raw = Unlock::key_file(&[3u8; 32]).expect("raw key file");
        assert_eq!(
            sealed.unseal(&raw, &[1; 16]).expect("unseal").as_bytes(),
            master.as_bytes()
        );
        assert!(Unlock::key_file(b"short").is_err());
        // 32 bytes of text are a phrase, not a key: refused, as is a hex
        // key file with a bad digit at its end.
        for text in [
            &b"correct horse battery staple 123"[..],
            b"correct horse battery staple 1\r\n",
            b"correct horse battery staple 12\n",
        ] {
            assert_eq!(text.len(), 32);
            let e = Unlock::key_file(text).expect_err("text");
            assert!(e.to_string().contains("passphrase file"), "{e}");
        }
        // Random bytes that happen to end in a line end are a key (one file
        // in 128 would otherwise be refused).
        let mut random = [0x80u8; 32];
        random[31] = b'\n';
        assert!(Unlock::key_file(&random).is_ok());
        let mut bad = hex::encode([3u8; 32]);
        bad.replace_range(63.., "g");
        assert!(Unlock::key_file(bad.as_bytes()).is_err());
    }

    #[test]
    fn wrapped_data_key_is_bound_to_subject_and_version() {
        let master = SecretKey::generate();
        let dk = SecretKey::generate();
        let w = wrap(&master, &data_key_aad("alice", 1), dk.as_bytes());
        assert_eq!(w.len(), WRAPPED_LEN);
        assert!(unwrap_key(&master, &data_key_aad("alice", 1), &w).is_some());
        assert!(unwrap_key(&master, &data_key_aad("bob", 1), &w).is_none());
        assert!(unwrap_key(&master, &data_key_aad("alice", 2), &w).is_none());
        assert!(unwrap_key(&SecretKey::generate(), &data_key_aad("alice", 1), &w).is_none());
    }

    #[test]
    fn debug_prints_no_secret() {
        let k = SecretKey::from_bytes([0x42; 32]);
        assert!(!format!("{k:?}").contains("42"));
        let u = Unlock::passphrase(b"hunter2".to_vec());
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
