//! Telling a wrong URL from bad rows. A 404 or a redirect on every row is not a problem
//! of the rows but of the settings (a wrong path in `BACKEND_URL`, http redirected to
//! https): marking each row failed for an hour with one warning apiece would bury the
//! one fact the operator needs.
//!
//! The rule, for one table of one source in one pass: the rows sent before any is
//! stored, all rejected with the same 404 or 405, three of them; or any row answered with
//! a redirect (3xx: a redirect is about the URL, never about the row). Rejected rows are
//! held until the pattern is known; what is held when a row is stored, a different
//! status comes, or the table's pass ends was the rows' own problem. A row rejected that
//! way [`EVIDENCE_ATTEMPTS`] times already is no evidence any more and counts as a bad
//! row: otherwise three rows the backend really does not know, first in the retry
//! order, would hold the table's other rows back at every pass.

use rusqlite::types::Value;

/// Rows rejected the same way (404, 405) that make a wrong URL.
pub const STREAK: usize = 3;
/// A row tried this many times is no evidence of a wrong URL any more.
pub const EVIDENCE_ATTEMPTS: i64 = 10;

/// A rejected row whose fate waits for the pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub local_id: Value,
    pub reason: String,
}

/// What to do with rejected rows.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Keep them held: the next rows tell.
    Hold,
    /// The rows' own problem: fail each on the slow clock, with a warning.
    Rows(Vec<Held>),
    /// A wrong URL: stop the table, these rows are tried again soon.
    WrongUrl(WrongUrl),
}

/// The evidence of a wrong URL, for the error line.
#[derive(Debug, PartialEq)]
pub struct WrongUrl {
    pub status: u16,
    pub location: Option<String>,
    pub rows: Vec<Held>,
}

impl WrongUrl {
    /// The operator's line: the status, the endpoint `url`, and what to change.
    pub fn explain(&self, table: &str, endpoint: &str, url: &str) -> String {
        let hint = match &self.location {
            Some(location) => match location.strip_suffix(endpoint) {
                Some(base) if base.contains("://") => {
                    format!("the backend redirects to {location}: set BACKEND_URL to {base}")
                }
                _ => format!("the backend redirects to {location}: set BACKEND_URL to it"),
            },
            None if (300..400).contains(&self.status) => {
                "the backend redirects without saying where (no Location header): check BACKEND_URL"
                    .to_string()
            }
            None => "BACKEND_URL's path is probably wrong".to_string(),
        };
        let rows = match self.rows.len() {
            1 => "1 row".to_string(),
            n => format!("each of {n} rows"),
        };
        crate::redact::redact(&format!(
            "table {table}: the backend answered {status} to {rows} sent to {url}: {hint} (a configuration problem, not the rows'); the table's rows are tried again after a backoff, and at once when BACKEND_URL or the table's endpoint changes",
            status = self.status
        ))
    }
}

/// The rejections of one table's pass.
#[derive(Debug, Default)]
pub struct Rejections {
    held: Vec<Held>,
    status: Option<u16>,
    /// A row was stored, or rejected otherwise: the endpoint is reached.
    reached: bool,
}

impl Rejections {
    /// A row was stored: what is held was the rows' own problem.
    pub fn stored(&mut self) -> Vec<Held> {
        self.reached = true;
        std::mem::take(&mut self.held)
    }

    /// A row was rejected with `status`, after `attempts` earlier attempts.
    pub fn rejected(
        &mut self,
        row: Held,
        status: u16,
        location: Option<String>,
        attempts: i64,
    ) -> Verdict {
        if (300..400).contains(&status) {
            self.held.push(row);
            return Verdict::WrongUrl(WrongUrl {
                status,
                location,
                rows: std::mem::take(&mut self.held),
            });
        }
        let url_like = matches!(status, 404 | 405);
        if url_like && attempts >= EVIDENCE_ATTEMPTS {
            return Verdict::Rows(vec![row]);
        }
        // Any other rejection (a 422 validated the payload) proves the endpoint is there.
        if !url_like || self.reached || self.status.is_some_and(|s| s != status) {
            self.reached = true;
            let mut rows = std::mem::take(&mut self.held);
            rows.push(row);
            return Verdict::Rows(rows);
        }
        self.status = Some(status);
        self.held.push(row);
        if self.held.len() < STREAK {
            return Verdict::Hold;
        }
        Verdict::WrongUrl(WrongUrl {
            status,
            location,
            rows: std::mem::take(&mut self.held),
        })
    }

    /// The table's pass ended: what is still held was the rows' own problem.
    pub fn finish(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> Held {
        Held {
            local_id: Value::Integer(id),
            reason: format!("row {id}"),
        }
    }

    #[test]
    fn three_404_before_any_success_are_a_wrong_url() {
        let mut r = Rejections::default();
        assert_eq!(r.rejected(row(1), 404, None, 0), Verdict::Hold);
        assert_eq!(r.rejected(row(2), 404, None, 0), Verdict::Hold);
        let Verdict::WrongUrl(w) = r.rejected(row(3), 404, None, 0) else {
            panic!("not a wrong URL")
        };
        assert_eq!(w.rows.len(), 3);
        let line = w.explain("evenement", "/api/evenements", "http://h/x/api/evenements");
        assert!(line.contains("404") && line.contains("BACKEND_URL's path is probably wrong"));
    }

    #[test]
    fn a_success_or_another_status_makes_them_the_rows_own() {
        let mut r = Rejections::default();
        assert_eq!(r.rejected(row(1), 404, None, 0), Verdict::Hold);
        assert_eq!(r.stored(), [row(1)]);
        assert_eq!(
            r.rejected(row(2), 404, None, 0),
            Verdict::Rows(vec![row(2)])
        );
        let mut r = Rejections::default();
        assert_eq!(r.rejected(row(1), 404, None, 0), Verdict::Hold);
        assert_eq!(
            r.rejected(row(2), 405, None, 0),
            Verdict::Rows(vec![row(1), row(2)])
        );
        let mut r = Rejections::default();
        assert_eq!(r.rejected(row(1), 404, None, 0), Verdict::Hold);
        assert_eq!(
            r.rejected(row(2), 422, None, 0),
            Verdict::Rows(vec![row(1), row(2)])
        );
        let mut r = Rejections::default();
        assert_eq!(r.rejected(row(1), 404, None, 0), Verdict::Hold);
        assert_eq!(r.finish(), [row(1)]);
    }

    #[test]
    fn rows_tried_often_are_no_evidence_and_a_redirect_is_at_once() {
        let mut r = Rejections::default();
        let often = EVIDENCE_ATTEMPTS;
        assert_eq!(
            r.rejected(row(1), 404, None, often),
            Verdict::Rows(vec![row(1)])
        );
        assert_eq!(r.rejected(row(2), 404, None, 0), Verdict::Hold);
        let location = Some("https://h/api/evenements".to_string());
        let Verdict::WrongUrl(w) = r.rejected(row(3), 301, location, often) else {
            panic!("not a wrong URL")
        };
        assert_eq!(w.rows, [row(2), row(3)]);
        let line = w.explain("evenement", "/api/evenements", "http://h/api/evenements");
        assert!(
            line.contains("redirects to https://h/api/evenements: set BACKEND_URL to https://h"),
            "{line}"
        );
    }
}
