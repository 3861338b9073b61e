//! The target for eventd's journal: segment files read back after a crash, a power cut or a
//! bad disk, as eventd and `powernode-agent events` read them.

use eventd::segment;
use powernode_types::node_api::EventRecord;

/// A segment file's bytes ([`segment::scan`]), then each record as eventd decodes it.
///
/// Properties: reading stops at a byte that exists, and says why exactly when it stops before
/// the end; the good part is exactly the records handed over, framed again; a decoded record
/// encodes back to a record that decodes to itself.
pub fn journal_segment(data: &[u8]) {
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let scan = segment::scan(data, data.len() as u64, |index, payload| {
        assert_eq!(
            index,
            payloads.len() as u64,
            "records are numbered in order"
        );
        payloads.push(payload.to_vec());
        true
    })
    .expect("reading from memory cannot fail");
    assert_eq!(scan.file_len, data.len() as u64);
    assert_eq!(scan.records, payloads.len() as u64);
    assert!(scan.good_len <= scan.file_len);
    assert_eq!(
        scan.bad.is_none(),
        scan.good_len == scan.file_len,
        "a reason exactly when reading stopped early: {scan:?}"
    );
    let mut framed = Vec::new();
    for payload in &payloads {
        segment::frame(&mut framed, payload).expect("a record read back frames again");
    }
    assert_eq!(
        framed,
        data[..scan.good_len as usize],
        "the good part is the records"
    );
    for payload in &payloads {
        if let Ok(record) = postcard::from_bytes::<EventRecord>(payload) {
            let again = postcard::to_stdvec(&record).expect("a decoded record encodes");
            assert_eq!(
                postcard::from_bytes::<EventRecord>(&again).ok(),
                Some(record),
                "a record encodes back to itself"
            );
        }
    }
}
