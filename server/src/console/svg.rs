//! The device page's charts, drawn here as inline SVG: a bar per hour (rows received)
//! and a line (backlog), over a fixed window of hours, with labelled axes and a
//! `<title>` per point for its tooltip. Colours are presentation attributes, not
//! styles, so the pages' CSP (no inline style) holds.

use maud::{Markup, html};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
/// Room for the y axis labels on the left and the day labels below.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 8.0;

/// One hour's value; `None`: nothing known for that hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Unix seconds, a multiple of 3600.
    pub hour: i64,
    pub value: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Bars,
    Line,
}

/// A chart of `points` (one per hour, oldest first) with element id `id`.
pub fn chart(id: &str, title: &str, unit: &str, shape: Shape, points: &[Point]) -> Markup {
    let max = points
        .iter()
        .filter_map(|p| p.value)
        .max()
        .unwrap_or(0)
        .max(1);
    let n = points.len().max(1) as f64;
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let step = plot_w / n;
    let x = |i: usize| LEFT + i as f64 * step;
    let y = |v: u64| TOP + plot_h - (v as f64 / max as f64) * plot_h;
    let tooltip = |p: &Point| match p.value {
        Some(v) => format!("{}: {v} {unit}", hour_label(p.hour)),
        None => format!("{}: no heartbeat", hour_label(p.hour)),
    };
    // The line is cut where an hour has no value.
    let mut segments: Vec<String> = Vec::new();
    let mut current = String::new();
    for (i, p) in points.iter().enumerate() {
        match p.value {
            Some(v) => {
                let cmd = if current.is_empty() { 'M' } else { 'L' };
                current.push_str(&format!("{cmd}{:.1} {:.1} ", x(i) + step / 2.0, y(v)));
            }
            None if !current.is_empty() => segments.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    let days: Vec<(usize, i64)> = points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.hour.rem_euclid(86_400) == 0)
        .map(|(i, p)| (i, p.hour))
        .collect();
    html! {
        svg id=(id) class="chart" xmlns="http://www.w3.org/2000/svg" role="img"
            viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } aria-label=(title) {
            title { (title) }
            // Axes and their labels: the y range, and a tick at each UTC midnight.
            line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(TOP + plot_h) stroke="#8c959f" {}
            line x1=(LEFT) y1=(TOP + plot_h) x2=(WIDTH) y2=(TOP + plot_h) stroke="#8c959f" {}
            text x=(LEFT - 4.0) y=(TOP + 8.0) text-anchor="end" font-size="10" fill="#57606a" { (max) }
            text x=(LEFT - 4.0) y=(TOP + plot_h) text-anchor="end" font-size="10" fill="#57606a" { "0" }
            text x="4" y=(TOP + plot_h / 2.0) font-size="10" fill="#57606a" { (unit) }
            @for (i, hour) in &days {
                line x1=(x(*i)) y1=(TOP + plot_h) x2=(x(*i)) y2=(TOP + plot_h + 4.0) stroke="#8c959f" {}
                text x=(x(*i) + 2.0) y=(HEIGHT - 6.0) font-size="10" fill="#57606a" { (day_label(*hour)) }
            }
            @match shape {
                Shape::Bars => {
                    @for (i, p) in points.iter().enumerate() {
                        @if let Some(v) = p.value.filter(|v| *v > 0) {
                            rect x={ (format!("{:.1}", x(i))) } y={ (format!("{:.1}", y(v))) }
                                width={ (format!("{:.2}", (step - 0.5).max(0.5))) }
                                height={ (format!("{:.1}", TOP + plot_h - y(v))) } fill="#0969da" {
                                title { (tooltip(p)) }
                            }
                        }
                    }
                }
                Shape::Line => {
                    @for d in &segments {
                        path d=(d.trim_end()) fill="none" stroke="#bc4c00" stroke-width="1.5" {}
                    }
                    @for (i, p) in points.iter().enumerate() {
                        @if let Some(v) = p.value {
                            circle cx={ (format!("{:.1}", x(i) + step / 2.0)) } cy={ (format!("{:.1}", y(v))) }
                                r="1.6" fill="#bc4c00" {
                                title { (tooltip(p)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `Tue 18 Nov`: the first two words and the month of the HTTP date.
fn day_label(hour: i64) -> String {
    let date = super::layout::absolute(Some(hour));
    // "Tue, 18 Nov 2025 00:00:00 GMT"
    let mut words = date.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(day), Some(n), Some(month)) => format!("{} {n} {month}", day.trim_end_matches(',')),
        _ => date,
    }
}

/// `Tue 18 Nov 14:00 UTC`.
fn hour_label(hour: i64) -> String {
    let hh = hour.rem_euclid(86_400) / 3600;
    format!("{} {hh:02}:00 UTC", day_label(hour))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_lines_have_a_tooltip_per_point_and_labelled_axes() {
        let day = 20_000 * 86_400;
        let points: Vec<Point> = (0..48)
            .map(|h| Point {
                hour: day - 24 * 3600 + h * 3600,
                value: (h % 5 != 0).then_some(h as u64),
            })
            .collect();
        let bars = chart("chart-rows", "Rows", "rows", Shape::Bars, &points).into_string();
        assert!(bars.starts_with("<svg id=\"chart-rows\""), "{bars}");
        assert_eq!(bars.matches("<rect").count(), 38, "one per hour with rows");
        assert!(
            bars.contains("<title>Fri 04 Oct 00:00 UTC: 24 rows</title>"),
            "{bars}"
        );
        assert!(
            bars.contains(">47</text>"),
            "the y axis goes to the largest value"
        );
        assert!(!bars.contains("style="), "no inline style (CSP)");
        let line = chart("chart-backlog", "Backlog", "rows", Shape::Line, &points).into_string();
        assert_eq!(
            line.matches("<path").count(),
            10,
            "cut at each hour without a value"
        );
        assert_eq!(line.matches("<circle").count(), 38);
    }
}
