//! Golden vectors: exact bytes of every stored and exchanged format, from
//! fixed keys, hashes and timestamps. A failure here means a format
//! changed; update `docs/storage.md` together with these constants, and
//! only when the change is deliberate. The docs carry a Python script that
//! recomputes the same bytes outside Rust.

use ed25519_dalek::SigningKey;
use protocol::receipt::ENDORSEMENT_LEN;
use storage::chunk::{
    encode_chunk, merkle_root, root_from_path, Chunk, KeyChain, KeyEndorsement, MerkleTree,
    Receipt, SignedHead, HEAD_LEN,
};
use storage::crypto::{
    self, data_key_aad, record_aad, signing_key_aad, KdfParams, SealedMaster, SecretKey, Unlock,
    SEALED_MASTER_LEN,
};
use storage::entry::{entry_hash, EntryRef, Hash, Kind};
use storage::state;

/// 2025-11-24T16:00:00Z in unix milliseconds, as in `entry::tests`.
const T0: u64 = 1_764_000_000_000;

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// The data key of subject "cust-42" in these vectors.
fn data_key() -> SecretKey {
    SecretKey::from_bytes([1u8; 32])
}

const RECORD_NONCE: [u8; 12] = [2u8; 12];
const EVENT_PAYLOAD: &[u8] = br#"{"partner_id":"lender-1","purposes":["kyc"]}"#;

/// The ciphertext of the record at seq 7: "hello" under the data key,
/// bound to subject "cust-42", seq 7, key version 1.
fn record_ciphertext() -> Vec<u8> {
    data_key().seal_with_nonce(&RECORD_NONCE, &record_aad("cust-42", 7, 1), b"hello")
}

/// Entry 6: a plaintext consent event, after an entry whose hash is 0xab × 32.
fn entry6() -> Vec<u8> {
    EntryRef {
        kind: Kind::ConsentGranted,
        seq: 6,
        timestamp_ms: T0,
        prev_hash: [0xab; 32],
        key_version: 0,
        nonce: [0; 12],
        subject: "cust-42",
        payload: EVENT_PAYLOAD,
    }
    .encode()
}

/// Entry 7: an encrypted record, chained to entry 6.
fn entry7() -> Vec<u8> {
    let ct = record_ciphertext();
    EntryRef {
        kind: Kind::Record,
        seq: 7,
        timestamp_ms: T0 + 1,
        prev_hash: entry_hash(&entry6()),
        key_version: 1,
        nonce: RECORD_NONCE,
        subject: "cust-42",
        payload: &ct,
    }
    .encode()
}

/// The head closing the commit group of entries 6 and 7.
fn head() -> SignedHead {
    let hashes = [entry_hash(&entry6()), entry_hash(&entry7())];
    SignedHead::sign(
        &signing_key(),
        0,
        6,
        7,
        hashes[1],
        merkle_root(&hashes),
        T0 + 1,
    )
}

#[test]
fn record_ciphertext_vector() {
    let ct = record_ciphertext();
    assert_eq!(hex::encode(&ct), RECORD_CT);
    let pt = data_key()
        .open(&RECORD_NONCE, &record_aad("cust-42", 7, 1), &ct)
        .expect("opens with the AAD it was sealed with");
    assert_eq!(pt.as_slice(), b"hello");
    // The same ciphertext presented at another seq does not open.
    assert!(data_key()
        .open(&RECORD_NONCE, &record_aad("cust-42", 8, 1), &ct)
        .is_none());
}

#[test]
fn entry_vectors() {
    let e6 = entry6();
    let e7 = entry7();
    assert_eq!(hex::encode(&e6), ENTRY6);
    assert_eq!(hex::encode(entry_hash(&e6)), ENTRY6_HASH);
    assert_eq!(hex::encode(&e7), ENTRY7);
    assert_eq!(hex::encode(entry_hash(&e7)), ENTRY7_HASH);
    // Entry 6 is a consent event as the vault would take it.
    state::mutations(&EntryRef::decode(&e6).expect("decodes")).expect("a consent_granted payload");
    assert_eq!(
        EntryRef::decode(&e7).expect("decodes").payload,
        record_ciphertext().as_slice()
    );
}

/// The entry of docs/storage.md section 3 (and of `entry::tests`).
#[test]
fn the_sections_entry_vector() {
    let bytes = EntryRef {
        kind: Kind::Record,
        seq: 7,
        timestamp_ms: T0,
        prev_hash: [0xab; 32],
        key_version: 1,
        nonce: [0x11; 12],
        subject: "cust-42",
        payload: b"\x01\x02\x03",
    }
    .encode();
    assert_eq!(hex::encode(&bytes), ENTRY_RS_GOLDEN);
    assert_eq!(hex::encode(entry_hash(&bytes)), ENTRY_RS_GOLDEN_HASH);
}

#[test]
fn signed_head_vector() {
    let h = head();
    let enc = h.encode();
    assert_eq!(enc.len(), HEAD_LEN);
    assert_eq!(
        hex::encode(signing_key().verifying_key().as_bytes()),
        PUBLIC_KEY
    );
    assert_eq!(hex::encode(&enc), HEAD);
    assert!(h.verify(&signing_key().verifying_key()));
    assert_eq!(SignedHead::decode(&enc).expect("decodes"), h);
}

#[test]
fn chunk_vector() {
    let e6 = entry6();
    let e7 = entry7();
    let h = head();
    let enc = encode_chunk(6, &[&e6, &e7], Some(&h));
    assert_eq!(hex::encode(&enc), CHUNK);
    let crc = crc32fast::hash(&enc[..enc.len() - 4]);
    assert_eq!(hex::encode(crc.to_be_bytes()), CHUNK_CRC);
    let c = Chunk::decode(&enc).expect("decodes");
    assert_eq!(c.first_seq, 6);
    assert_eq!(c.entries, vec![e6.as_slice(), e7.as_slice()]);
    assert_eq!(c.head, Some(h));
}

fn three_leaves() -> [Hash; 3] {
    [[0x11; 32], [0x22; 32], [0x33; 32]]
}

#[test]
fn merkle_vector() {
    let leaves = three_leaves();
    let tree = MerkleTree::new(&leaves);
    assert_eq!(hex::encode(tree.root()), MERKLE_ROOT_3);
    let path = tree.path(1);
    let path_hex: Vec<String> = path.iter().map(hex::encode).collect();
    assert_eq!(path_hex, MERKLE_PATH_3_1);
    assert_eq!(
        root_from_path(&leaves[1], 1, 3, &path),
        Some(tree.root()),
        "the path leads to the root"
    );
    // The root of the two-entry group in the chunk vector.
    let group = [entry_hash(&entry6()), entry_hash(&entry7())];
    assert_eq!(hex::encode(merkle_root(&group)), GROUP_ROOT);
}

#[test]
fn receipt_vector() {
    let group = [entry_hash(&entry6()), entry_hash(&entry7())];
    let r = Receipt {
        seq: 7,
        entry_hash: group[1],
        path: MerkleTree::new(&group).path(1),
        head: head(),
    };
    assert_eq!(r.verify(&signing_key().verifying_key()), Ok(()));
    let enc = r.encode();
    assert_eq!(hex::encode(&enc), RECEIPT);
    assert_eq!(Receipt::decode(&enc).expect("decodes"), r);
}

#[test]
fn aad_vectors() {
    assert_eq!(hex::encode(data_key_aad("cust-42", 1)), DATA_KEY_AAD);
    assert_eq!(hex::encode(record_aad("cust-42", 7, 1)), RECORD_AAD);
    assert_eq!(hex::encode(signing_key_aad(0)), SIGNING_KEY_AAD);
}

#[test]
fn key_name_vectors() {
    assert_eq!(
        hex::encode(state::data_key_name("cust-42", 1)),
        DATA_KEY_NAME
    );
    assert_eq!(hex::encode(state::signing_key_name(0)), SIGNING_KEY_NAME);
    assert_eq!(
        hex::encode(storage::vault::pending_name(7)),
        PENDING_MARKER_NAME
    );
    let marker = hex::decode(PENDING_MARKER).expect("hex");
    let (first_seq, names) = storage::vault::decode_pending(&marker).expect("decodes");
    assert_eq!(first_seq, 7);
    assert_eq!(names, vec![state::data_key_name("cust-42", 1)]);
}

/// Layout of a passphrase-sealed master key (the ciphertext is a stand-in:
/// a real one needs a full argon2id run).
#[test]
fn sealed_master_passphrase_layout() {
    let s = SealedMaster {
        kdf: Some(KdfParams::default()),
        salt: [0x5a; 16],
        nonce: [0xa5; 12],
        ciphertext: vec![0xcc; 48],
    };
    let enc = s.encode();
    assert_eq!(enc.len(), SEALED_MASTER_LEN);
    assert_eq!(hex::encode(&enc), SEALED_MASTER_PASSPHRASE);
    assert_eq!(SealedMaster::decode(&enc).expect("decodes"), s);
}

/// A key-file-sealed master key with a real ciphertext: master key
/// 0x04 × 32 for vault id 0x06 × 16 under the key file 0x03 × 32.
#[test]
fn sealed_master_key_file_vector() {
    let vault_id = [0x06u8; 16];
    let mut aad = b"fintrust-vault/master/v1\0".to_vec();
    aad.extend_from_slice(&vault_id);
    let nonce = [0xa5u8; 12];
    let s = SealedMaster {
        kdf: None,
        salt: [0x5a; 16],
        nonce,
        ciphertext: SecretKey::from_bytes([3u8; 32]).seal_with_nonce(&nonce, &aad, &[4u8; 32]),
    };
    let enc = s.encode();
    assert_eq!(enc.len(), SEALED_MASTER_LEN);
    assert_eq!(hex::encode(&enc), SEALED_MASTER_KEY_FILE);
    let unlock = Unlock::key_file(&[3u8; 32]).expect("a 32-byte key file");
    let decoded = SealedMaster::decode(&enc).expect("decodes");
    let master = decoded.unseal(&unlock, &vault_id).expect("unseals");
    // The unsealed key is the one sealed: it opens what [4; 32] sealed.
    let probe = SecretKey::from_bytes([4u8; 32]).seal_with_nonce(&[0; 12], b"", b"probe");
    assert!(master.open(&[0; 12], b"", &probe).is_some());
    assert!(matches!(
        decoded.unseal(&unlock, &[0x07; 16]),
        Err(storage::Error::WrongSecret)
    ));
}

/// A wrapped subject data key: `nonce || AES-256-GCM-SIV(master, nonce,
/// data key, data_key_aad)`. `crypto::wrap` draws a random nonce, so the
/// vector builds the same bytes with a fixed one and checks that
/// `unwrap_key` opens them.
#[test]
fn wrapped_data_key_vector() {
    let master = SecretKey::from_bytes([4u8; 32]);
    let nonce = [0x0bu8; 12];
    let aad = data_key_aad("cust-42", 1);
    let wrapped = [
        nonce.as_slice(),
        &master.seal_with_nonce(&nonce, &aad, &[1u8; 32]),
    ]
    .concat();
    assert_eq!(wrapped.len(), crypto::WRAPPED_LEN);
    assert_eq!(hex::encode(&wrapped), WRAPPED_DATA_KEY);
    let dk = crypto::unwrap_key(&master, &aad, &wrapped).expect("unwraps");
    assert_eq!(
        dk.seal_with_nonce(&RECORD_NONCE, &record_aad("cust-42", 7, 1), b"hello"),
        record_ciphertext(),
        "the unwrapped key is the data key of the record vector"
    );
    assert!(crypto::unwrap_key(&master, &data_key_aad("cust-43", 1), &wrapped).is_none());
}

/// Signing key 0 (the seed 0x07 × 32) endorses key 1 (the seed 0x08 × 32)
/// in the `key_rotated` entry at seq 9.
#[test]
fn key_endorsement_vector() {
    let new = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
    let e = KeyEndorsement::sign(&signing_key(), 1, &new, 9);
    assert_eq!(hex::encode(e.encode()), ENDORSEMENT);
    assert_eq!(e.encode().len(), ENDORSEMENT_LEN);
    assert_eq!(KeyEndorsement::decode(&e.encode()).expect("decodes"), e);
    assert!(e.verify(&signing_key().verifying_key()));
    assert!(!e.verify(&new), "only the previous key endorses");
    let chain = KeyChain::from_endorsements(signing_key().verifying_key(), &[e]).expect("chains");
    assert_eq!(chain.key(1), Some(&new));
    // Any changed byte breaks the endorsement.
    let bytes = e.encode();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 1;
        let Ok(forged) = KeyEndorsement::decode(&b) else {
            continue;
        };
        assert!(
            KeyChain::from_endorsements(signing_key().verifying_key(), &[forged]).is_err(),
            "byte {i}"
        );
    }
    assert!(KeyEndorsement::decode(&bytes[..ENDORSEMENT_LEN - 1]).is_err());
}

#[test]
fn write_ahead_segment_vector() {
    use storage::wal::{read_segment, Batch, GroupWrite, TreeId};
    let bytes = hex::decode(WAL_SEGMENT).expect("hex");
    let seg = read_segment(&bytes).expect("the segment reads");
    assert!(!seg.torn);
    let mut keys = Batch::new(TreeId::Keys);
    keys.insert(b"pending".to_vec(), vec![1, 2]);
    keys.remove(b"next/x".to_vec());
    let mut log = Batch::new(TreeId::Log);
    log.insert(7u64.to_be_bytes().to_vec(), b"chunk".to_vec());
    assert_eq!(
        seg.groups,
        vec![GroupWrite {
            first_seq: 7,
            batches: vec![keys, log],
        }]
    );
    // One byte less is a torn record, not an error.
    let cut = read_segment(&bytes[..bytes.len() - 1]).expect("a torn segment reads");
    assert!(cut.torn && cut.groups.is_empty());
}

/// The `log` tree's value for CHUNK (410 bytes) lying at offset 4096 of
/// `DIR/chunks`: u64 offset, u32 length.
const LOG_POINTER: &str = "00000000000010000000019a";

#[test]
fn log_pointer_vector() {
    use storage::logfile::{decode_pointer, encode_pointer};
    let chunk_len = u32::try_from(CHUNK.len() / 2).expect("a short chunk");
    assert_eq!(chunk_len, 410);
    assert_eq!(hex::encode(encode_pointer(4096, chunk_len)), LOG_POINTER);
    let bytes = hex::decode(LOG_POINTER).expect("hex");
    assert_eq!(decode_pointer(&bytes), Some((4096, 410)));
    assert_eq!(decode_pointer(&bytes[..11]), None);
}

/// docs/storage.md lists every vector as a `NAME hex` line (the output of
/// its Python script): the page must keep showing the bytes pinned here.
#[test]
fn docs_show_the_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/storage.md");
    let docs = std::fs::read_to_string(path).expect("docs/storage.md is readable");
    let vectors: [(&str, String); 28] = [
        ("ENTRY_RS_GOLDEN", ENTRY_RS_GOLDEN.into()),
        ("ENTRY_RS_GOLDEN_HASH", ENTRY_RS_GOLDEN_HASH.into()),
        ("RECORD_CT", RECORD_CT.into()),
        ("ENTRY6", ENTRY6.into()),
        ("ENTRY6_HASH", ENTRY6_HASH.into()),
        ("ENTRY7", ENTRY7.into()),
        ("ENTRY7_HASH", ENTRY7_HASH.into()),
        ("PUBLIC_KEY", PUBLIC_KEY.into()),
        ("GROUP_ROOT", GROUP_ROOT.into()),
        ("HEAD", HEAD.into()),
        ("CHUNK", CHUNK.into()),
        ("CHUNK_CRC", CHUNK_CRC.into()),
        ("MERKLE_ROOT_3", MERKLE_ROOT_3.into()),
        ("MERKLE_PATH_3_1", MERKLE_PATH_3_1.join(" ")),
        ("RECEIPT", RECEIPT.into()),
        ("DATA_KEY_AAD", DATA_KEY_AAD.into()),
        ("RECORD_AAD", RECORD_AAD.into()),
        ("SIGNING_KEY_AAD", SIGNING_KEY_AAD.into()),
        ("DATA_KEY_NAME", DATA_KEY_NAME.into()),
        ("SIGNING_KEY_NAME", SIGNING_KEY_NAME.into()),
        ("PENDING_MARKER_NAME", PENDING_MARKER_NAME.into()),
        ("PENDING_MARKER", PENDING_MARKER.into()),
        ("SEALED_MASTER_PASSPHRASE", SEALED_MASTER_PASSPHRASE.into()),
        ("SEALED_MASTER_KEY_FILE", SEALED_MASTER_KEY_FILE.into()),
        ("WRAPPED_DATA_KEY", WRAPPED_DATA_KEY.into()),
        ("ENDORSEMENT", ENDORSEMENT.into()),
        ("WAL_SEGMENT", WAL_SEGMENT.into()),
        ("LOG_POINTER", LOG_POINTER.into()),
    ];
    for (name, hex) in vectors {
        let line = format!("{name} {hex}");
        assert!(
            docs.lines().any(|l| l == line),
            "docs/storage.md does not show {name}: expected the line\n{line}"
        );
    }
    // Section 3 draws the same entry field by field.
    let line = format!("entry_hash = {ENTRY_RS_GOLDEN_HASH}");
    assert!(
        docs.lines().any(|l| l == line),
        "docs/storage.md section 3 does not show the line\n{line}"
    );
}

// The vectors. docs/storage.md shows the same bytes; its Python script
// recomputes them independently.

/// A write-ahead segment holding one record: the group at seq 7 with a
/// `keys` batch (insert "pending" = 01 02, remove "next/x") and a `log`
/// batch (insert u64 7 = "chunk"). Checked against the encoder in
/// `storage::wal`'s tests and read back here.
const WAL_SEGMENT: &str = "46545657414c000200000047d6f7b133000000000000000700020200000002010000000770656e64696e6700000002010200000000066e6578742f78000000000101000000080000000000000007000000056368756e6b";

/// Section 3's entry: a record of "cust-42" at seq 7 after an entry whose
/// hash is 0xab × 32, nonce 0x11 × 12, payload 01 02 03.
const ENTRY_RS_GOLDEN: &str = "010200000000000000070000019ab697e800abababababababababababababababababababababababababababababababab000000011111111111111111111111110007637573742d343200000003010203";
const ENTRY_RS_GOLDEN_HASH: &str =
    "3fcd2d489aa7af2e6636c35009d5a378027e9b31cd00e0fe81fc2be8da7d8911";
/// "hello" sealed for subject "cust-42", seq 7, key version 1.
const RECORD_CT: &str = "6cbc8b76941d957d26e254ce730fafc378b670669a";
const ENTRY6_HASH: &str = "29eb68f00c5178b90139b6187782763ee05985f902624ea7644a1d44a7c0256c";
const ENTRY7_HASH: &str = "da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7";
/// ed25519 public key of the seed 0x07 × 32.
const PUBLIC_KEY: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
/// Merkle root of [ENTRY6_HASH, ENTRY7_HASH].
const GROUP_ROOT: &str = "e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b";
const CHUNK_CRC: &str = "d06832d7";
/// Merkle root of the leaves 0x11 × 32, 0x22 × 32, 0x33 × 32.
const MERKLE_ROOT_3: &str = "837c5b1d77b8bfb02d2cd23a50360cad6a76f18917f6cd6490629f5ea23eded9";
/// Audit path of leaf 1 of those three: leaf hash of leaf 0, then leaf hash of leaf 2.
const MERKLE_PATH_3_1: [&str; 2] = [
    "54ae36309b7aad630bf4ae6c7ade960bad283d3545023747b84e36fb944b787c",
    "c998ac9e5b6fc08376ddbb311d14605d3ff1c4cfae2c196bf66433953d85d0ee",
];
const DATA_KEY_AAD: &str =
    "66696e74727573742d7661756c742f646174612d6b65792f76310000000001637573742d3432";
const RECORD_AAD: &str =
    "66696e74727573742d7661756c742f7265636f72642f763100000000000000000700000001637573742d3432";
const SIGNING_KEY_AAD: &str =
    "66696e74727573742d7661756c742f7369676e696e672d6b65792f76310000000000";
/// "dk/cust-42" 0x00 u32 1.
const DATA_KEY_NAME: &str = "646b2f637573742d34320000000001";
const ENDORSEMENT: &str =
    "000000011398f62c6d1a457c51ba6a4b5f3dbd2f69fca93216218dc8997e416bd17d93ca00000000000000098de5f68a3fc4becd4201ed770e36dfaf50cecb0015929a992117d2174dc581846197a190f31840732a2aa27009ce936fc733f32c62b57db967cbb74dfd63af0c";
/// "signing/" u32 0.
const SIGNING_KEY_NAME: &str = "7369676e696e672f00000000";
/// "pending/" u64 7: the pending marker of the group at seq 7.
const PENDING_MARKER_NAME: &str = "70656e64696e672f0000000000000007";
/// Its value when the group creates the data key of (`cust-42`, 1): u64
/// 7, then u16 15 and the key's name.
const PENDING_MARKER: &str = "0000000000000007000f646b2f637573742d34320000000001";
/// nonce 0x0b × 12 || AES-256-GCM-SIV(0x04 × 32, nonce, 0x01 × 32, DATA_KEY_AAD).
const WRAPPED_DATA_KEY: &str = "0b0b0b0b0b0b0b0b0b0b0b0b4fd9237190c24274a5af56aacf007660d2e794d21938324f9b0fc64076866e60cc636216d25ae440e850c62ba5892cb8";

/// Entry 6.
const ENTRY6: &str = concat!(
    "01",                                                               // version
    "03",               // kind = consent_granted (3)
    "0000000000000006", // seq
    "0000019ab697e800", // timestamp_ms
    "abababababababababababababababababababababababababababababababab", // prev_hash
    "00000000",         // key_version
    "000000000000000000000000", // nonce
    "0007",             // subject_len
    "637573742d3432",   // "cust-42"
    "0000002c",         // payload_len
    "7b22706172746e65725f6964223a226c656e6465722d31222c22707572706f736573223a5b226b7963225d7d", // {"partner_id":"lender-1","purposes":["kyc"]}
);

/// Entry 7.
const ENTRY7: &str = concat!(
    "01",                                                               // version
    "02",                                                               // kind = record (2)
    "0000000000000007",                                                 // seq
    "0000019ab697e801",                                                 // timestamp_ms
    "29eb68f00c5178b90139b6187782763ee05985f902624ea7644a1d44a7c0256c", // prev_hash = ENTRY6_HASH
    "00000001",                                                         // key_version
    "020202020202020202020202",                                         // nonce
    "0007",                                                             // subject_len
    "637573742d3432",                                                   // "cust-42"
    "00000015",                                                         // payload_len
    "6cbc8b76941d957d26e254ce730fafc378b670669a",                       // payload = RECORD_CT
);

/// The signed head of the group 6..=7.
const HEAD: &str = concat!(
    "01",                                                               // version
    "00000000",                                                         // key_id
    "0000000000000006",                                                 // group_first_seq
    "0000000000000007",                                                 // last_seq
    "da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7", // last_hash = ENTRY7_HASH
    "e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b", // group_root = GROUP_ROOT
    "0000019ab697e801",                                                 // timestamp_ms
    "d228d4013f28506569727a5e8ab1de0e1928c08cfbb05a124c4f3f374e7c2247", // signature R
    "fb6f8e0286e2b44112c8206ace4f5b476ad0a9ff441d227b32ace54eb6eab60f", // signature S
);

/// The chunk of entries 6 and 7 with their head.
const CHUNK: &str = concat!(
    "46564c43",                                                         // magic "FVLC"
    "01",                                                               // version
    "01",                                                               // flags: head follows
    "0000000000000006",                                                 // first_seq
    "00000002",                                                         // entry_count
    "0000007b",                                                         // entry length (123)
    "01",                                                               // entry 6: version
    "03",               // entry 6: kind = consent_granted (3)
    "0000000000000006", // entry 6: seq
    "0000019ab697e800", // entry 6: timestamp_ms
    "abababababababababababababababababababababababababababababababab", // entry 6: prev_hash
    "00000000",         // entry 6: key_version
    "000000000000000000000000", // entry 6: nonce
    "0007",             // entry 6: subject_len
    "637573742d3432",   // entry 6: "cust-42"
    "0000002c",         // entry 6: payload_len
    "7b22706172746e65725f6964223a226c656e6465722d31222c22707572706f736573223a5b226b7963225d7d", // entry 6: {"partner":"lender-1"}
    "00000064",         // entry length (100)
    "01",               // entry 7: version
    "02",               // entry 7: kind = record (2)
    "0000000000000007", // entry 7: seq
    "0000019ab697e801", // entry 7: timestamp_ms
    "29eb68f00c5178b90139b6187782763ee05985f902624ea7644a1d44a7c0256c", // entry 7: prev_hash = ENTRY6_HASH
    "00000001",                                                         // entry 7: key_version
    "020202020202020202020202",                                         // entry 7: nonce
    "0007",                                                             // entry 7: subject_len
    "637573742d3432",                                                   // entry 7: "cust-42"
    "00000015",                                                         // entry 7: payload_len
    "6cbc8b76941d957d26e254ce730fafc378b670669a", // entry 7: payload = RECORD_CT
    "01",                                         // head: version
    "00000000",                                   // head: key_id
    "0000000000000006",                           // head: group_first_seq
    "0000000000000007",                           // head: last_seq
    "da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7", // head: last_hash = ENTRY7_HASH
    "e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b", // head: group_root = GROUP_ROOT
    "0000019ab697e801",                                                 // head: timestamp_ms
    "d228d4013f28506569727a5e8ab1de0e1928c08cfbb05a124c4f3f374e7c2247", // head: signature R
    "fb6f8e0286e2b44112c8206ace4f5b476ad0a9ff441d227b32ace54eb6eab60f", // head: signature S
    "d06832d7", // CRC32 of everything before
);

/// The receipt of entry 7.
const RECEIPT: &str = concat!(
    "01",                                                               // version
    "0000000000000007",                                                 // seq
    "da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7", // entry_hash = ENTRY7_HASH
    "01",                                                               // path_len
    "9936ed63fe2212d6d795b02ae0301d20ab6386a7354ec338330cc61ae31a3f48", // path[0] = leaf hash of entry 6
    "01",                                                               // head: version
    "00000000",                                                         // head: key_id
    "0000000000000006",                                                 // head: group_first_seq
    "0000000000000007",                                                 // head: last_seq
    "da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7", // head: last_hash = ENTRY7_HASH
    "e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b", // head: group_root = GROUP_ROOT
    "0000019ab697e801",                                                 // head: timestamp_ms
    "d228d4013f28506569727a5e8ab1de0e1928c08cfbb05a124c4f3f374e7c2247", // head: signature R
    "fb6f8e0286e2b44112c8206ace4f5b476ad0a9ff441d227b32ace54eb6eab60f", // head: signature S
);

/// A passphrase-sealed master key (stand-in ciphertext).
const SEALED_MASTER_PASSPHRASE: &str = concat!(
    "01", // version
    "01", // kdf = 1, argon2id
    "00004c00", // m_kib = 19456
    "00000002", // t = 2
    "00000001", // p = 1
    "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", // salt
    "a5a5a5a5a5a5a5a5a5a5a5a5", // nonce
    "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc", // ciphertext (stand-in)
);

/// A key-file-sealed master key.
const SEALED_MASTER_KEY_FILE: &str = concat!(
    "01", // version
    "02", // kdf = 2, key file
    "00000000", // m_kib = 0
    "00000000", // t = 0
    "00000000", // p = 0
    "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", // salt (unused with a key file)
    "a5a5a5a5a5a5a5a5a5a5a5a5", // nonce
    "d6f996b272703a773f976e99e271922b9ac1b40684967e1e1be3df1ba5752631705cbc0204db68e939908a201acdd309", // AES-256-GCM-SIV(0x03 × 32, nonce, 0x04 × 32, master AAD)
);
