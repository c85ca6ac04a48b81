//! A small SVG chart: data coordinates mapped into a plot area with labelled axes and ticks.
//! Enough for the report's four figures, with nothing to install; [`super::png`] rasterises the
//! same SVG.

use std::fmt::Write;

const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 66.0;
const BOTTOM: f64 = 58.0;

/// Escapes text for SVG and HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub struct Plot {
    width: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
    /// x is drawn on a log10 scale (values must be > 0).
    log_x: bool,
    title: String,
    x_label: String,
    y_label: String,
    body: String,
    legend: Vec<(String, String)>,
    /// Category labels in place of numeric x ticks.
    x_labels: Option<Vec<(f64, String)>>,
}

/// About `n` round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater)
        || !lo.is_finite()
        || !hi.is_finite()
    {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        // Snap -0.0 and rounding residue.
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// A tick label with just the digits the step needs.
fn label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// A range padded by `pad` of its width on both sides (a width for a single value).
pub fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let w = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1e-3) * 0.1
    };
    (lo - pad * w, hi + pad * w)
}

impl Plot {
    pub fn new(title: &str, x_label: &str, y_label: &str, x: (f64, f64), y: (f64, f64)) -> Plot {
        Plot {
            width: 760.0,
            height: 440.0,
            x,
            y,
            log_x: false,
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            body: String::new(),
            legend: Vec::new(),
            x_labels: None,
        }
    }

    /// Labels these x positions instead of numeric ticks (categories).
    pub fn x_labels(&mut self, labels: Vec<(f64, String)>) {
        self.x_labels = Some(labels);
    }

    pub fn log_x(mut self) -> Plot {
        self.log_x = true;
        self
    }

    fn fx(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log_x {
            (v.log10(), self.x.0.log10(), self.x.1.log10())
        } else {
            (v, self.x.0, self.x.1)
        };
        let px = LEFT + (v - lo) / (hi - lo).max(f64::MIN_POSITIVE) * (self.width - LEFT - RIGHT);
        // Far outside the plot is clipped anyway; huge coordinates would upset a rasteriser.
        px.clamp(-self.width, 2.0 * self.width)
    }

    fn fy(&self, v: f64) -> f64 {
        let (lo, hi) = self.y;
        let py = self.height
            - BOTTOM
            - (v - lo) / (hi - lo).max(f64::MIN_POSITIVE) * (self.height - TOP - BOTTOM);
        py.clamp(-self.height, 2.0 * self.height)
    }

    fn points(&self, pts: &[(f64, f64)]) -> String {
        let mut s = String::with_capacity(pts.len() * 14);
        for (x, y) in pts {
            let _ = write!(s, "{:.1},{:.1} ", self.fx(*x), self.fy(*y));
        }
        s
    }

    pub fn line(&mut self, pts: &[(f64, f64)], colour: &str, width: f64, opacity: f64) {
        let p = self.points(pts);
        let _ = writeln!(
            self.body,
            r#"<polyline points="{p}" fill="none" stroke="{colour}" stroke-width="{width}" stroke-opacity="{opacity:.3}"/>"#
        );
    }

    /// A filled band between `lower` and `upper`, both over the same x values.
    pub fn band(&mut self, lower: &[(f64, f64)], upper: &[(f64, f64)], colour: &str, opacity: f64) {
        let mut pts: Vec<(f64, f64)> = upper.to_vec();
        pts.extend(lower.iter().rev());
        let p = self.points(&pts);
        let _ = writeln!(
            self.body,
            r#"<polygon points="{p}" fill="{colour}" fill-opacity="{opacity:.3}" stroke="none"/>"#
        );
    }

    /// A rectangle between data corners.
    pub fn rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, colour: &str) {
        let (a, b) = (self.fx(x0), self.fx(x1));
        let (c, d) = (self.fy(y0), self.fy(y1));
        let _ = writeln!(
            self.body,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}" stroke="white" stroke-width="0.5"/>"#,
            a.min(b),
            c.min(d),
            (b - a).abs().max(0.5),
            (d - c).abs()
        );
    }

    /// A vertical marker across the plot; `text` goes into the legend.
    pub fn marker(&mut self, x: f64, colour: &str, dashed: bool, text: &str) {
        let px = self.fx(x);
        let dash = if dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            self.body,
            r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.6"{dash}/>"#,
            TOP,
            self.height - BOTTOM
        );
        self.legend(colour, text);
    }

    pub fn legend(&mut self, colour: &str, text: &str) {
        self.legend.push((colour.into(), text.into()));
    }

    pub fn svg(&self) -> String {
        let (w, h) = (self.width, self.height);
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, sans-serif">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{:.1}" y="26" font-size="16" text-anchor="middle" font-weight="bold">{}</text>
<defs><clipPath id="area"><rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}"/></clipPath></defs>
"#,
            w / 2.0,
            escape(&self.title),
            w - LEFT - RIGHT,
            h - TOP - BOTTOM
        );
        // Grid and ticks.
        let x_ticks: Vec<(f64, String)> = if let Some(labels) = &self.x_labels {
            labels.clone()
        } else if self.log_x {
            let (lo, hi) = (
                self.x.0.log10().floor() as i32,
                self.x.1.log10().ceil() as i32,
            );
            (lo..=hi)
                .map(|e| 10f64.powi(e))
                .filter(|v| *v >= self.x.0 * 0.999 && *v <= self.x.1 * 1.001)
                .map(|v| (v, format!("{v}")))
                .collect()
        } else {
            let t = ticks(self.x.0, self.x.1, 8);
            let step = if t.len() > 1 { t[1] - t[0] } else { 1.0 };
            t.into_iter().map(|v| (v, label(v, step))).collect()
        };
        let y_ticks = ticks(self.y.0, self.y.1, 6);
        let y_step = if y_ticks.len() > 1 {
            y_ticks[1] - y_ticks[0]
        } else {
            1.0
        };
        for (v, text) in &x_ticks {
            let px = self.fx(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{px:.1}" y="{:.1}" font-size="11" text-anchor="middle">{text}</text>"##,
                h - BOTTOM,
                h - BOTTOM + 16.0
            );
        }
        for v in &y_ticks {
            let py = self.fy(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                w - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                label(*v, y_step)
            );
        }
        let _ = writeln!(s, r#"<g clip-path="url(#area)">{}</g>"#, self.body);
        // Axes and their labels.
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>
<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>
<text x="18" y="{:.1}" font-size="13" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            w - LEFT - RIGHT,
            h - TOP - BOTTOM,
            LEFT + (w - LEFT - RIGHT) / 2.0,
            h - 14.0,
            escape(&self.x_label),
            TOP + (h - TOP - BOTTOM) / 2.0,
            TOP + (h - TOP - BOTTOM) / 2.0,
            escape(&self.y_label)
        );
        // The legend: a row (or two) between the title and the plot.
        let (mut x, mut y) = (LEFT, 48.0);
        for (colour, text) in &self.legend {
            let item = 26.0 + 6.6 * text.chars().count() as f64;
            if x + item > w - RIGHT && x > LEFT {
                (x, y) = (LEFT, y + 15.0);
            }
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="14" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                y - 9.0,
                x + 18.0,
                y,
                escape(text)
            );
            x += item + 12.0;
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let t = ticks(0.912, 0.938, 6);
        assert!(t.first().unwrap() >= &0.912 && t.last().unwrap() <= &0.938);
        assert!(t.len() >= 3);
        assert_eq!(label(0.915, 0.005), "0.915");
        assert_eq!(escape("a<b & c"), "a&lt;b &amp; c");
    }
}
