//! `wsotel::fuzzing::FrameScan`: any byte stream, read in any sizes, leaves the scan in the same
//! state as read at once (tungstenite's read sizes must not change where the server thinks the
//! next frame starts), and nothing panics, whatever lengths the headers claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::fuzzing::FrameScan;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size (1-32 bytes per read), the rest is the stream.
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let mut whole = FrameScan::default();
    whole.scan(stream);
    let mut pieces = FrameScan::default();
    for chunk in stream.chunks(usize::from(step % 32) + 1) {
        pieces.scan(chunk);
    }
    assert_eq!(whole, pieces);
    // A Close frame that starts at a frame boundary is always seen, with its code.
    if whole.at_frame_boundary() && whole.closes() < u32::MAX {
        let mut s = whole.clone();
        s.scan(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
        assert_eq!(s.closes(), whole.closes() + 1);
        assert_eq!(s.last_close_code(), Some(1000));
        assert!(s.at_frame_boundary());
    }
});
