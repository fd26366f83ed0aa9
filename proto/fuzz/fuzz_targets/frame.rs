//! Feeds arbitrary bytes as a stream to `split_frame`, in chunks whose size
//! the first input byte picks (so frames arrive whole, split, or several at
//! once), and decodes every frame that comes out.
#![no_main]

use bytes::{Bytes, BytesMut};
use canopy_proto::frame::{split_frame, PREFIX_LEN};
use canopy_proto::{decode, encode_to_vec, HEADER_LEN, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match split_frame(&mut buf) {
                Ok(Some(frame)) => {
                    assert!((HEADER_LEN..=MAX_MESSAGE).contains(&frame.len()));
                    assert_eq!(buf.len(), before - PREFIX_LEN - frame.len());
                    check(&frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame was consumed");
                    break;
                }
                // A bad length ends the stream, as it would a connection.
                Err(_) => return,
            }
        }
    }
});

fn check(buf: &Bytes) {
    if let Ok(m) = decode(buf) {
        let again = decode(&Bytes::from(encode_to_vec(&m)));
        assert_eq!(again.as_ref(), Ok(&m), "re-encoding changed the message");
    }
}
