//! The body of an answer, read as it arrives under the size limit: bytes are counted as they
//! come and, for a gzipped answer, as they inflate, so a response that is too large (or a small
//! one that inflates without bound) is refused before it is held.

use std::io::Write;

use flate2::write::GzDecoder;

use crate::feed::error::FetchErrorKind;

/// The body of an answer as it arrives, inflated if it is gzipped.
pub(super) enum LimitedBody {
    Plain(Vec<u8>),
    Gzipped(Box<GzDecoder<LimitedBuffer>>),
}

impl LimitedBody {
    /// A body of at most `limit` bytes; `declared` is the Content-Length, already checked
    /// against the limit.
    pub(super) fn new(gzipped: bool, limit: usize, declared: Option<u64>) -> LimitedBody {
        if gzipped {
            LimitedBody::Gzipped(Box::new(GzDecoder::new(LimitedBuffer {
                bytes: Vec::new(),
                limit,
            })))
        } else {
            // Room for the whole body at once: a large page grown by doubling would briefly
            // hold one and a half times its size.
            let declared = declared.map_or(0, |length| usize::try_from(length).unwrap_or(limit));
            LimitedBody::Plain(Vec::with_capacity(declared.min(limit)))
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) -> Result<(), FetchErrorKind> {
        match self {
            LimitedBody::Plain(bytes) => bytes.extend_from_slice(data),
            LimitedBody::Gzipped(decoder) => decoder.write_all(data).map_err(inflate_error)?,
        }
        Ok(())
    }

    pub(super) fn finish(self) -> Result<Vec<u8>, FetchErrorKind> {
        match self {
            LimitedBody::Plain(bytes) => Ok(bytes),
            LimitedBody::Gzipped(decoder) => Ok(decoder.finish().map_err(inflate_error)?.bytes),
        }
    }
}

fn inflate_error(err: std::io::Error) -> FetchErrorKind {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<OverLimit>())
    {
        Some(OverLimit(limit)) => FetchErrorKind::TooLarge(format!(
            "the response inflates to over the limit of {limit} bytes (max_response_bytes)"
        )),
        None => FetchErrorKind::Unreadable(format!("the gzipped response does not inflate: {err}")),
    }
}

/// Inflated bytes, refused past the limit.
pub(super) struct LimitedBuffer {
    bytes: Vec<u8>,
    limit: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("over the limit of {0} bytes")]
struct OverLimit(usize);

impl Write for LimitedBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + data.len() > self.limit {
            return Err(std::io::Error::other(OverLimit(self.limit)));
        }
        self.bytes.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    pub fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap_or_else(|e| panic!("{e}"));
        encoder.finish().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn gzip_inflates_in_pieces_and_is_refused_past_the_limit() {
        let text = br#"{"account_id":"a","amount":5}"#.repeat(100);
        let compressed = gzip(&text);
        let mut answer = LimitedBody::new(true, text.len(), None);
        for piece in compressed.chunks(7) {
            answer.push(piece).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(answer.finish().map_err(|e| e.to_string()), Ok(text.clone()));

        let mut answer = LimitedBody::new(true, text.len() - 1, None);
        let refused = answer
            .push(&compressed)
            .and_then(|()| answer.finish().map(|_| ()));
        let reason = refused.map_err(|e| e.to_string());
        assert!(
            matches!(&reason, Err(r) if r.contains("inflates to over the limit")),
            "{reason:?}"
        );

        let mut answer = LimitedBody::new(true, 1 << 20, None);
        let garbage = answer
            .push(b"this is not gzip at all")
            .and_then(|()| answer.finish().map(|_| ()));
        assert!(garbage.is_err());
    }
}
