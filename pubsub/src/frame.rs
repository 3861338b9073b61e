//! The wire envelope: postcard-encoded frames; a `SOCK_SEQPACKET` message carries one or
//! more whole frames back to back (postcard frames are self-delimiting), so a burst of updates
//! costs one send and one wake-up rather than one per item.
//!
//! The item value inside `Update` is itself the postcard encoding of the topic type, carried as
//! opaque bytes: the envelope decodes without knowing the type (ipcmonitor relies on this), and
//! the publisher sends the exact bytes it wrote to the checkpoint file, encoded once.

use serde::{Deserialize, Serialize};

/// Version of the frame envelope; both ends send it in [`Hello`] and refuse any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side sends or accepts, in bytes.
///
/// Unix seqpacket messages are bounded by the sender's socket buffer (212 KiB by default on
/// Linux); 128 KiB leaves room while carrying the 64 KiB items the benchmark uses.
pub const MAX_FRAME: usize = 128 * 1024;

/// Bytes reserved in a frame for the envelope around an item's value (tag, key, lengths).
pub const FRAME_OVERHEAD: usize = 1 + 2 + crate::key::MAX_KEY_LEN + 5;

/// Largest encoded item value a publication accepts (see docs/pubsub.md, "Size").
pub const MAX_ITEM: usize = MAX_FRAME - FRAME_OVERHEAD;

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello<'a> {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u32,
    /// The topic's name.
    pub topic: &'a str,
    /// The topic type's schema version (the subscriber's is informative).
    pub schema_version: u32,
    /// Whether the topic is persistent.
    pub persistent: bool,
    /// The publisher's instance: a new value each time the publisher starts (0 from subscribers).
    pub generation: u64,
}

/// One message on a publication's socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Handshake, first from the subscriber, then from the publisher.
    #[serde(borrow)]
    Hello(Hello<'a>),
    /// The current value of one key.
    Update {
        /// The item's key.
        key: &'a str,
        /// The postcard encoding of the item.
        #[serde(with = "serde_bytes")]
        value: &'a [u8],
    },
    /// The key no longer exists.
    Delete {
        /// The item's key.
        key: &'a str,
    },
    /// Every item the publisher held when the subscriber connected has been sent.
    Synchronized,
    /// The publisher has published everything it had at start-up (EVE's restart barrier).
    Restarted {
        /// How many times the publisher has signalled it; grows monotonically.
        counter: u64,
    },
}

/// The variant index postcard gives `Frame::Update`.
const UPDATE_TAG: u8 = 1;

impl<'a> Frame<'a> {
    /// Encodes the frame into a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding a Frame cannot fail: every field is a plain string, bytes or integer.
        postcard::to_stdvec(self).expect("frames always encode")
    }

    /// Appends the frame's encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Encoding a Frame cannot fail: every field is a plain string, bytes or integer.
        let bytes = postcard::to_extend(self, std::mem::take(out)).expect("frames always encode");
        *out = bytes;
    }

    /// Decodes the frames of one message, in order.
    pub fn decode_all(bytes: &'a [u8]) -> FrameIter<'a> {
        FrameIter { rest: bytes }
    }

    /// Decodes one frame; trailing bytes are an error so that a frame means exactly one thing.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, postcard::Error> {
        let (frame, rest) = postcard::take_from_bytes(bytes)?;
        if rest.is_empty() {
            Ok(frame)
        } else {
            Err(postcard::Error::DeserializeUnexpectedEnd)
        }
    }
}

/// The frames of one message; see [`Frame::decode_all`].
pub struct FrameIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for FrameIter<'a> {
    type Item = Result<Frame<'a>, postcard::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match postcard::take_from_bytes(self.rest) {
            Ok((frame, rest)) => {
                self.rest = rest;
                Some(Ok(frame))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// Appends the part of an `Update` frame that precedes the value, so the value can be sent from
/// where it lies with a vectored send instead of being copied into a frame buffer.
pub fn update_header(key: &str, value_len: usize, out: &mut Vec<u8>) {
    out.push(UPDATE_TAG);
    push_varint(out, key.len());
    out.extend_from_slice(key.as_bytes());
    push_varint(out, value_len);
}

/// postcard's unsigned varint: 7 bits a byte, low group first.
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_header_matches_postcard() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, MAX_ITEM] {
            let value = vec![7u8; len];
            let key = "k".repeat(len % 200 + 1);
            let full = Frame::Update {
                key: &key,
                value: &value,
            }
            .encode();
            let mut header = vec![0xaa];
            update_header(&key, value.len(), &mut header);
            header.remove(0);
            header.extend_from_slice(&value);
            assert_eq!(header, full, "value length {len}");
        }
    }

    #[test]
    fn round_trip_and_trailing_bytes() {
        let frames = [
            Frame::Hello(Hello {
                protocol: 1,
                topic: "T",
                schema_version: 3,
                persistent: true,
                generation: 9,
            }),
            Frame::Update {
                key: "a",
                value: b"xyz",
            },
            Frame::Delete { key: "a" },
            Frame::Synchronized,
            Frame::Restarted { counter: 2 },
        ];
        for f in frames {
            let mut bytes = f.encode();
            assert_eq!(Frame::decode(&bytes).unwrap(), f);
            bytes.push(0);
            assert!(Frame::decode(&bytes).is_err());
        }
    }

    /// The envelope is a wire contract: this fails when its encoding changes, which must come
    /// with a PROTOCOL_VERSION bump.
    #[test]
    fn golden_encoding() {
        let hello = Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            topic: "NodeIdentity",
            schema_version: 2,
            persistent: true,
            generation: 300,
        });
        assert_eq!(
            PROTOCOL_VERSION, 1,
            "update the golden bytes below with the new version"
        );
        assert_eq!(
            hex(&hello.encode()),
            "00010c4e6f64654964656e746974790201ac02"
        );
        assert_eq!(
            hex(&Frame::Update {
                key: "k",
                value: &[1, 2]
            }
            .encode()),
            "01016b020102"
        );
        assert_eq!(hex(&Frame::Delete { key: "k" }.encode()), "02016b");
        assert_eq!(hex(&Frame::Synchronized.encode()), "03");
        assert_eq!(hex(&Frame::Restarted { counter: 5 }.encode()), "0405");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn several_frames_in_one_message() {
        let mut msg = Vec::new();
        Frame::Update {
            key: "a",
            value: b"1",
        }
        .encode_into(&mut msg);
        Frame::Delete { key: "b" }.encode_into(&mut msg);
        Frame::Synchronized.encode_into(&mut msg);
        let frames: Vec<_> = Frame::decode_all(&msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            frames,
            [
                Frame::Update {
                    key: "a",
                    value: b"1"
                },
                Frame::Delete { key: "b" },
                Frame::Synchronized
            ]
        );
        msg.push(0x09); // a tag no frame has
        assert!(Frame::decode_all(&msg).last().unwrap().is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Frame::decode(&bytes);
            let _ = Frame::decode_all(&bytes).count();
        }
    }
}
