//! What to look at when a feed's page requests keep failing the same way: most such failures
//! are a mistake in the config (a URL that answers 404, a host name that does not resolve, the
//! other format), and retrying for ever would hide it. The daemon goes on retrying; the hint is
//! shown in `status` and said once in the log.

use hyper::StatusCode;

use crate::feed::error::{FetchError, FetchErrorKind, FetchTarget};

/// How many page requests in a row must fail the same way before the hint is given.
pub(super) const HINT_AFTER: u32 = 3;

/// The hint a failed page request suggests, if it is one of the failures that usually mean a
/// mistake rather than bad luck.
pub fn hint_for(err: &FetchError) -> Option<String> {
    if let FetchErrorKind::Refused(_) = &err.kind {
        return Some(
            "the feed sends the reader to another origin than its own: set body_origin if that is meant".into(),
        );
    }
    if err.target != FetchTarget::Page {
        return None;
    }
    match &err.kind {
        FetchErrorKind::Connect(causes) if causes.starts_with("TLS: ") => {
            let meaning = causes.trim_start_matches("TLS: ");
            Some(format!(
                "the feed's TLS: {}",
                meaning.split(" (").next().unwrap_or(meaning)
            ))
        }
        FetchErrorKind::Status { status, .. }
            if *status == StatusCode::NOT_FOUND || *status == StatusCode::GONE =>
        {
            Some(format!("the feed URL answers {status}: is the URL right?"))
        }
        FetchErrorKind::Status { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN =>
        {
            Some(format!(
                "the feed refuses the request ({status}): does it need credentials?"
            ))
        }
        FetchErrorKind::Status { status, .. } if *status == StatusCode::METHOD_NOT_ALLOWED => {
            Some("the feed URL does not answer GET: is it the feed's URL?".into())
        }
        FetchErrorKind::Connect(causes) if does_not_resolve(causes) => {
            Some("the feed's host name does not resolve: is the host right?".into())
        }
        FetchErrorKind::Connect(causes) if causes.contains("Connection refused") => Some(
            "nothing listens at the feed's address: is the feed running, and on this port?".into(),
        ),
        FetchErrorKind::OtherFormat { reads_as, .. } => Some(format!(
            "the feed answers pages of the {reads_as} format: is format = \"{reads_as}\" meant?"
        )),
        // An HTML page where a feed page should be: a web page, not the feed.
        FetchErrorKind::Unreadable(reason) if reason.contains("it starts with \"<") => {
            Some("the feed URL answers an HTML page, not a feed page: is it the feed's URL?".into())
        }
        FetchErrorKind::TooLarge(_) => Some(
            "the feed's pages are larger than max_response_bytes: raise it for this feed".into(),
        ),
        _ => None,
    }
}

fn does_not_resolve(causes: &str) -> bool {
    [
        "dns error",
        "failed to lookup address",
        "Name or service not known",
        "No address associated",
        "nodename nor servname",
    ]
    .iter()
    .any(|sign| causes.contains(sign))
}

/// The hint a run of failures has earned: the same hint for HINT_AFTER page failures in a row.
#[derive(Debug, Default)]
pub(super) struct HintRun {
    /// The hint of the last failed page request, and how many in a row had it.
    candidate: Option<(String, u32)>,
    /// The hint given, once earned; cleared when the feed recovers.
    pub(super) given: Option<String>,
}

impl HintRun {
    /// Takes a failure into account; returns the hint when it is newly earned (to be logged).
    pub(super) fn failed(&mut self, err: &FetchError) -> Option<String> {
        if err.target != FetchTarget::Page && !matches!(err.kind, FetchErrorKind::Refused(_)) {
            return None;
        }
        let Some(hint) = hint_for(err) else {
            self.candidate = None;
            return None;
        };
        let count = match &self.candidate {
            Some((previous, count)) if *previous == hint => count + 1,
            _ => 1,
        };
        self.candidate = Some((hint.clone(), count));
        if count >= HINT_AFTER && self.given.as_ref() != Some(&hint) {
            self.given = Some(hint.clone());
            return Some(hint);
        }
        None
    }

    pub(super) fn recovered(&mut self) {
        *self = HintRun::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(kind: FetchErrorKind) -> FetchError {
        kind.fetching(FetchTarget::Page, "page at offset 0".into())
    }

    #[test]
    fn mistakes_earn_a_hint_after_a_few_failures_in_a_row() {
        let not_found = page(FetchErrorKind::Status {
            status: StatusCode::NOT_FOUND,
            retry_after: None,
        });
        let mut run = HintRun::default();
        assert_eq!(run.failed(&not_found), None);
        assert_eq!(run.failed(&not_found), None);
        let hint = run.failed(&not_found);
        assert!(hint
            .as_deref()
            .is_some_and(|h| h.contains("404 Not Found: is the URL right")));
        assert_eq!(run.failed(&not_found), None, "said once");
        assert!(run.given.is_some());
        run.recovered();
        assert!(run.given.is_none());

        // A transient failure in between starts the count again.
        let flaky = page(FetchErrorKind::Status {
            status: StatusCode::BAD_GATEWAY,
            retry_after: None,
        });
        for err in [&not_found, &not_found, &flaky, &not_found, &not_found] {
            assert_eq!(run.failed(err), None);
        }
        // Body failures are the event's, not the URL's.
        let body = FetchErrorKind::Status {
            status: StatusCode::NOT_FOUND,
            retry_after: None,
        }
        .fetching(FetchTarget::Body, "body".into());
        assert_eq!(hint_for(&body), None);
    }

    #[test]
    fn each_mistake_has_its_own_hint() {
        let hint = |kind| hint_for(&page(kind)).unwrap_or_default();
        assert!(hint(FetchErrorKind::Connect(
            "dns error: failed to lookup address information: Name or service not known".into()
        ))
        .contains("does not resolve"));
        assert!(hint(FetchErrorKind::Connect(
            "tcp connect error: Connection refused (os error 111)".into()
        ))
        .contains("nothing listens"));
        assert!(hint(FetchErrorKind::OtherFormat {
            configured: "flux",
            reads_as: "inline"
        })
        .contains("format = \"inline\""));
        assert!(hint(FetchErrorKind::Status {
            status: StatusCode::FORBIDDEN,
            retry_after: None
        })
        .contains("credentials"));
        assert_eq!(
            hint_for(&page(FetchErrorKind::Transfer("reset".into()))),
            None
        );
    }
}
