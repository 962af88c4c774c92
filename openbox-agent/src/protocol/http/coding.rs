//! Content codings (RFC 9110 §8.4.1): gzip, deflate, br and zstd bodies decoded so that
//! redaction, the local policy, Core and OTLP see the text, not the compressed bytes.
//!
//! A body is decoded as a stream into at most `max` bytes: the decoder reads the kept
//! (possibly cut) compressed bytes through a fixed buffer and stops at the cap, so a
//! decompression bomb costs `max` bytes of output and the decoder's own window (bounded
//! below for zstd; 32 KiB for deflate; at most 16 MiB for brotli), never its decoded
//! size.

use std::io::{self, Read};

/// Largest zstd window accepted: RFC 9659 §3 limits the `zstd` content coding to 8 MiB
/// windows, so a frame asking for more is not an HTTP body (or is hostile).
const ZSTD_MAX_WINDOW: u64 = 8 << 20;
/// Decoder read size: output is copied out in pieces of this size, never more.
const CHUNK: usize = 16 * 1024;

/// What decoding a body gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The decoded bytes, at most `max` (a prefix when `complete` is false).
    pub body: Vec<u8>,
    /// The coding names as the header listed them, e.g. `gzip` or `deflate, br`.
    pub codings: String,
    /// All of the (kept) input decoded, within the cap.
    pub complete: bool,
    /// Why decoding stopped early, when it was not the cap.
    pub error: Option<String>,
}

/// The codings of a `Content-Encoding` value, in the order they were applied; `None`
/// for no coding (absent, empty or only `identity`).
pub fn codings(content_encoding: Option<&str>) -> Option<Vec<String>> {
    let v: Vec<String> = content_encoding?
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Decodes `body`, coded with `codings` in that order, into at most `max` bytes.
/// Codings are undone last first; each stage is capped at `max` too.
pub fn decode(codings: &[String], body: &[u8], max: usize) -> Decoded {
    let mut data = std::borrow::Cow::Borrowed(body);
    let mut complete = true;
    let mut error = None;
    for coding in codings.iter().rev() {
        let (out, stage_complete, stage_error) = match decode_one(coding, &data, max) {
            Ok(r) => r,
            Err(e) => (Vec::new(), false, Some(e)),
        };
        data = std::borrow::Cow::Owned(out);
        complete &= stage_complete;
        if stage_error.is_some() {
            error = stage_error;
            break;
        }
    }
    Decoded {
        body: data.into_owned(),
        codings: codings.join(", "),
        complete: complete && error.is_none(),
        error,
    }
}

/// How a message's coded body was decoded, for its span's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyCoding {
    pub codings: String,
    /// Body bytes on the wire (coded), whether kept or not.
    pub wire_size: u64,
    /// The body now holds decoded bytes (all, or a prefix up to an error).
    pub decoded: bool,
    pub error: Option<String>,
}

impl BodyCoding {
    /// `<prefix>.decoded` (the codings undone), `<prefix>.size` (the coded size, as
    /// the semantic conventions define `http.*.body.size`) and `<prefix>.decode_error`.
    pub fn attributes(&self, prefix: &str, attrs: &mut serde_json::Map<String, serde_json::Value>) {
        if self.decoded {
            attrs.insert(format!("{prefix}.decoded"), self.codings.as_str().into());
        }
        if let Some(e) = &self.error {
            attrs.insert(format!("{prefix}.decode_error"), e.as_str().into());
        }
        attrs.insert(format!("{prefix}.size"), self.wire_size.into());
    }
}

/// A message body decoded by its `Content-Encoding`: (body, complete, coding). A body
/// without coding passes through; one that cannot be decoded at all stays as it came,
/// with the error in its coding.
pub fn decode_body(
    headers: &[(String, String)],
    body: Vec<u8>,
    complete: bool,
    wire_size: u64,
    max: usize,
) -> (Vec<u8>, bool, Option<BodyCoding>) {
    let Some(list) = codings(super::header(headers, "content-encoding")) else {
        return (body, complete, None);
    };
    if body.is_empty() {
        return (body, complete, None);
    }
    let d = decode(&list, &body, max);
    let mut coding = BodyCoding {
        codings: d.codings,
        wire_size,
        decoded: false,
        error: d.error.clone(),
    };
    if d.body.is_empty() && d.error.is_some() {
        return (body, complete, Some(coding));
    }
    coding.decoded = true;
    // A cut coded body decodes to a prefix; so does one whose text passes the limit.
    (d.body, complete && d.complete, Some(coding))
}

/// One coding: (output ≤ max, whole input decoded within the cap, error).
type Stage = (Vec<u8>, bool, Option<String>);

fn decode_one(coding: &str, input: &[u8], max: usize) -> Result<Stage, String> {
    match coding {
        "gzip" | "x-gzip" => Ok(drain(flate2::read::MultiGzDecoder::new(input), max)),
        "deflate" => {
            // RFC 9110 §8.4.1.2: deflate is the zlib format, but servers have long sent
            // raw deflate under that name; the zlib header's check bits tell them apart.
            let zlib = input.len() >= 2
                && input[0] & 0x0f == 8
                && (u16::from(input[0]) << 8 | u16::from(input[1])) % 31 == 0;
            if zlib {
                Ok(drain(flate2::read::ZlibDecoder::new(input), max))
            } else {
                Ok(drain(flate2::read::DeflateDecoder::new(input), max))
            }
        }
        "br" => Ok(drain(
            brotli_decompressor::Decompressor::new(input, CHUNK),
            max,
        )),
        "zstd" => {
            let mut decoder = ruzstd::decoding::FrameDecoder::new();
            decoder.set_max_window_size(ZSTD_MAX_WINDOW);
            let reader = ruzstd::decoding::StreamingDecoder::new_with_decoder(input, decoder)
                .map_err(|e| format!("zstd frame header: {e}"))?;
            Ok(drain(reader, max))
        }
        other => Err(format!("content coding {other:?} is not supported")),
    }
}

/// Reads the decoder to its end or to `max` output bytes, whichever comes first.
fn drain(mut reader: impl Read, max: usize) -> Stage {
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        // One byte past the cap tells "exactly max" from "more than max".
        let want = (max + 1 - out.len()).min(CHUNK);
        match reader.read(&mut buf[..want]) {
            Ok(0) => return (out, true, None),
            Ok(n) => {
                if out.len() + n > max {
                    out.extend_from_slice(&buf[..max - out.len()]);
                    return (out, false, None);
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A cut body ends mid-stream: what was decoded so far is a true prefix.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (out, false, None),
            Err(e) => return (out, false, Some(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        io::Write,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// Counts live heap bytes, and the peak, of the test thread that arms it (other test
    /// threads allocate too, so only the armed thread's allocations count).
    struct Counting;

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn armed() -> bool {
        ARMED.try_with(|a| a.get()).unwrap_or(false)
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if armed() {
                let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            }
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if armed() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            }
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            if armed() {
                if new > layout.size() {
                    let now = LIVE.fetch_add(new - layout.size(), Ordering::Relaxed)
                        + (new - layout.size());
                    PEAK.fetch_max(now, Ordering::Relaxed);
                } else {
                    LIVE.fetch_sub(layout.size() - new, Ordering::Relaxed);
                }
            }
            unsafe { System.realloc(ptr, layout, new) }
        }
    }

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Peak heap growth of `f` on this thread.
    fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LIVE.store(0, Ordering::Relaxed);
        PEAK.store(0, Ordering::Relaxed);
        ARMED.with(|a| a.set(true));
        let r = f();
        ARMED.with(|a| a.set(false));
        (r, PEAK.load(Ordering::Relaxed))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn brotli(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(data).unwrap();
        }
        out
    }

    fn list(s: &str) -> Vec<String> {
        codings(Some(s)).unwrap()
    }

    const TEXT: &[u8] = br#"{"id":"chatcmpl-1","choices":[{"message":{"content":"hello"}}]}"#;

    #[test]
    fn every_supported_coding_round_trips() {
        let zlib = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(TEXT).unwrap();
            e.finish().unwrap()
        };
        let raw_deflate = {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(TEXT).unwrap();
            e.finish().unwrap()
        };
        let zstd =
            ruzstd::encoding::compress_to_vec(TEXT, ruzstd::encoding::CompressionLevel::Fastest);
        for (name, coded) in [
            ("gzip", gzip(TEXT)),
            ("x-gzip", gzip(TEXT)),
            ("deflate", zlib),
            ("deflate", raw_deflate),
            ("br", brotli(TEXT)),
            ("zstd", zstd),
        ] {
            let d = decode(&list(name), &coded, 1024);
            assert_eq!(d.body, TEXT, "{name}");
            assert!(d.complete, "{name}: {d:?}");
            assert_eq!(d.error, None, "{name}");
        }
    }

    #[test]
    fn stacked_codings_are_undone_last_first() {
        let coded = brotli(&gzip(TEXT));
        let d = decode(&list("gzip, br"), &coded, 1024);
        assert_eq!(d.body, TEXT);
        assert_eq!(d.codings, "gzip, br");
    }

    #[test]
    fn identity_and_absent_mean_no_coding() {
        assert_eq!(codings(None), None);
        assert_eq!(codings(Some("identity")), None);
        assert_eq!(codings(Some(" ")), None);
        assert_eq!(codings(Some("GZip")), Some(vec!["gzip".to_string()]));
    }

    #[test]
    fn output_is_capped_at_the_limit_and_marked_incomplete() {
        let big: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let d = decode(&list("gzip"), &gzip(&big), 1000);
        assert_eq!(d.body, &big[..1000]);
        assert!(!d.complete);
        assert_eq!(d.error, None);
        // Exactly at the cap is complete.
        let d = decode(&list("gzip"), &gzip(&big[..1000]), 1000);
        assert!(d.complete, "{d:?}");
    }

    #[test]
    fn a_cut_body_decodes_to_a_prefix() {
        let big: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let coded = gzip(&big);
        let d = decode(&list("gzip"), &coded[..coded.len() / 2], 1 << 20);
        assert!(!d.complete);
        assert!(!d.body.is_empty());
        assert_eq!(d.body, &big[..d.body.len()]);
    }

    #[test]
    fn garbage_and_unknown_codings_give_an_error_not_a_panic() {
        let d = decode(&list("gzip"), b"not gzip at all", 1024);
        assert!(!d.complete);
        assert!(d.error.is_some(), "{d:?}");
        let d = decode(&list("compress"), b"xx", 1024);
        assert!(d.error.unwrap().contains("not supported"));
        let d = decode(&list("zstd"), b"\x28\xb5\x2f", 1024);
        assert!(d.error.is_some());
        for name in ["gzip", "deflate", "br", "zstd"] {
            for n in 0..64u8 {
                let noise: Vec<u8> = (0..200u32).map(|i| (i as u8).wrapping_mul(n) ^ n).collect();
                let d = decode(&list(name), &noise, 4096);
                assert!(d.body.len() <= 4096);
            }
        }
    }

    #[test]
    fn a_zstd_frame_asking_for_a_huge_window_is_refused() {
        // Frame header: magic, descriptor 0x00 (window descriptor present, no
        // checksum/dict/size), window descriptor 0xf8 = 2^(10+31) bytes.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x01, 0x00, 0x00];
        let (d, peak) = peak_heap(|| decode(&list("zstd"), &frame, 1 << 16));
        assert!(d.error.is_some(), "{d:?}");
        assert!(peak < 1 << 20, "refusing it allocated {peak} bytes");
    }

    /// 1 GiB of zeros, gzip'd (about 1 MiB on the wire): the decoder stops at the limit
    /// and the heap never grows past the limit plus the decoder's fixed state.
    #[test]
    fn a_decompression_bomb_is_cut_at_the_limit_without_memory_growth() {
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            bomb.write_all(&zeros).unwrap();
        }
        let bomb = bomb.finish().unwrap();
        assert!(bomb.len() < 2 << 20, "the bomb is {} bytes", bomb.len());
        let limit = 64 * 1024;
        let (d, peak) = peak_heap(|| decode(&list("gzip"), &bomb, limit));
        eprintln!(
            "gzip bomb: {} bytes coded, peak heap {peak} bytes",
            bomb.len()
        );
        assert_eq!(d.body.len(), limit);
        assert!(d.body.iter().all(|&b| b == 0));
        assert!(!d.complete);
        // Output (limit), read buffer and the inflate state: a few hundred KiB, nowhere
        // near 1 GiB.
        let budget = limit + 512 * 1024;
        assert!(
            peak < budget,
            "decoding the bomb peaked at {peak} heap bytes (budget {budget})"
        );
        // The same with brotli (window up to 16 MiB by the format) and zstd.
        let br_bomb = brotli(&vec![0u8; 64 << 20]);
        let (d, peak) = peak_heap(|| decode(&list("br"), &br_bomb, limit));
        eprintln!(
            "br bomb: {} bytes coded, peak heap {peak} bytes",
            br_bomb.len()
        );
        assert_eq!(d.body.len(), limit);
        assert!(peak < 32 << 20, "brotli bomb peaked at {peak} heap bytes");
        // ruzstd's encoder writes a single-segment frame whose window is the content
        // size, so stay within the 8 MiB HTTP window.
        let zstd_bomb = ruzstd::encoding::compress_to_vec(
            &vec![0u8; 8 << 20][..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let (d, peak) = peak_heap(|| decode(&list("zstd"), &zstd_bomb, limit));
        eprintln!(
            "zstd bomb: {} bytes coded, peak heap {peak} bytes",
            zstd_bomb.len()
        );
        assert_eq!(d.body.len(), limit);
        assert!(
            peak < 2 * ZSTD_MAX_WINDOW as usize + zstd_bomb.len(),
            "zstd bomb peaked at {peak} heap bytes"
        );
    }
}
