//! The snapshot as text: an aligned table per table, coloured when asked.

use std::fmt::Write as _;

#[cfg(test)]
use super::{GroupStatus, PostgresStatus, RedisStatus};
use super::{Status, StreamStatus, TableStatus};
use strata_pipeline::streams::StreamName;

/// ANSI styling, or none.
#[derive(Debug, Clone, Copy)]
pub(super) struct Paint {
    /// Whether to emit escape codes at all.
    pub(super) color: bool,
}

impl Paint {
    fn wrap(self, code: &str, s: &str) -> String {
        if self.color && !s.is_empty() {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }
    pub(super) fn dim(self, s: &str) -> String {
        self.wrap("2", s)
    }
    pub(super) fn red(self, s: &str) -> String {
        self.wrap("31", s)
    }
    fn green(self, s: &str) -> String {
        self.wrap("32", s)
    }
    fn yellow(self, s: &str) -> String {
        self.wrap("33", s)
    }
}

/// A cell: its text and how to colour it (padding is computed on the plain text).
type Cell = (String, fn(Paint, &str) -> String);

fn plain(p: Paint, s: &str) -> String {
    let _ = p;
    s.to_string()
}

/// Human-readable milliseconds: `850ms`, `4.1s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The snapshot as an aligned table per table.
pub(super) fn render(s: &Status, p: Paint) -> String {
    let mut o = String::new();
    let pg = if s.postgres.ok {
        p.green("ok")
    } else {
        p.red(&format!(
            "unreachable: {}",
            s.postgres.error.as_deref().unwrap_or("?")
        ))
    };
    let _ = writeln!(
        o,
        "{}  {}  redis {}  postgres {pg}",
        p.bold("strata status"),
        s.time,
        s.redis.url
    );
    if s.tables.is_empty() {
        let _ = writeln!(o, "\nno schemas: nothing to show");
    }
    for t in &s.tables {
        o.push('\n');
        o.push_str(&render_table(t, p));
    }
    o
}

fn render_table(t: &TableStatus, p: Paint) -> String {
    let mut o = String::new();
    let mut facts = Vec::new();
    facts.push(match t.rows_last_minute {
        Some(n) => format!("{n} rows in the last minute"),
        None => p.dim("rows in the last minute: n/a"),
    });
    facts.push(if t.dead_letters > 0 {
        p.red(&format!(
            "{} dead letter{}",
            t.dead_letters,
            if t.dead_letters == 1 { "" } else { "s" }
        ))
    } else {
        p.green("no dead letters")
    });
    if let Some(c) = &t.chunks {
        let mut text = match c.live {
            Some(n) => format!("{n} live chunks"),
            None => "live chunks: n/a".into(),
        };
        if let Some(by_state) = &c.by_state {
            let states: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = write!(
                text,
                " (lifecycle: {})",
                if states.is_empty() {
                    "none yet".to_string()
                } else {
                    states.join(", ")
                }
            );
        }
        facts.push(text);
    }
    let _ = writeln!(o, "{}  {}", p.bold(&t.table), facts.join(" · "));
    if let Some(a) = &t.newest_archive {
        let _ = writeln!(
            o,
            "  newest archive: {}{}",
            a.path.as_deref().unwrap_or("?"),
            a.archived_at
                .as_deref()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &t.postgres_error {
        let _ = writeln!(o, "  {}", p.yellow(&format!("postgres: {e}")));
    }
    let header: Vec<Cell> = [
        "STREAM",
        "LENGTH",
        "DLQ",
        "GROUP",
        "LAG",
        "PENDING",
        "OLDEST PENDING",
        "CONSUMERS",
        "NODE",
    ]
    .iter()
    .map(|h| (h.to_string(), Paint::bold as fn(Paint, &str) -> String))
    .collect();
    // NODE only on a Redis Cluster.
    let with_node = t.streams.iter().any(|s| s.node.is_some());
    let mut rows: Vec<Vec<Cell>> = vec![header];
    // Lines printed under a row, outside the alignment.
    let mut notes: Vec<Vec<String>> = vec![Vec::new()];
    for (at, s) in t.streams.iter().enumerate() {
        for (i, g) in s.groups.iter().enumerate() {
            let first = i == 0;
            let stream: Cell = match (first, s.removed) {
                (false, _) => (String::new(), plain),
                (true, true) => (format!("{} (removed)", s.stream), Paint::yellow),
                (true, false) => (s.stream.clone(), if s.exists { plain } else { Paint::dim }),
            };
            let node: Cell = match (first, &s.node) {
                (true, Some(n)) => (n.clone(), plain),
                _ => (String::new(), plain),
            };
            let length: Cell = match (first, s.exists) {
                (false, _) => (String::new(), plain),
                (true, true) => (s.length.to_string(), plain),
                (true, false) => ("absent".into(), Paint::dim),
            };
            let dlq: Cell = match (first, s.dead_letters) {
                (false, _) => (String::new(), plain),
                (true, 0) => ("0".into(), plain),
                (true, n) => (n.to_string(), Paint::red),
            };
            let group: Cell = if g.exists {
                (g.group.clone(), plain)
            } else {
                (format!("{} (absent)", g.group), Paint::dim)
            };
            let lag: Cell = match (g.exists, g.lag) {
                (false, _) => ("-".into(), Paint::dim),
                (true, None) => ("?".into(), Paint::yellow),
                (true, Some(0)) => ("0".into(), plain),
                (true, Some(n)) => (n.to_string(), Paint::yellow),
            };
            let pending: Cell = match (g.exists, g.pending) {
                (false, _) => ("-".into(), Paint::dim),
                (true, 0) => ("0".into(), plain),
                (true, n) => (n.to_string(), Paint::yellow),
            };
            let oldest: Cell = match &g.oldest_pending {
                None => ("-".into(), Paint::dim),
                Some(o) => (
                    format!(
                        "{} old{}",
                        human_ms(o.age_ms),
                        o.idle_ms
                            .map(|i| format!(", idle {}", human_ms(i)))
                            .unwrap_or_default()
                    ),
                    Paint::yellow,
                ),
            };
            let consumers: Cell = if g.exists {
                (g.consumers.len().to_string(), plain)
            } else {
                ("-".into(), Paint::dim)
            };
            rows.push(vec![
                stream, length, dlq, group, lag, pending, oldest, consumers, node,
            ]);
            notes.push(
                g.consumers
                    .iter()
                    .map(|c| {
                        let mut line = format!(
                            "    └ {}  pending {}  idle {}",
                            c.name,
                            c.pending,
                            human_ms(c.idle_ms)
                        );
                        if let Some(i) = c.inactive_ms {
                            let _ = write!(line, "  inactive {}", human_ms(i));
                        }
                        p.dim(&line)
                    })
                    .collect(),
            );
        }
        // After a partitioned kind's last partition: its sums.
        let kind = |s: &StreamStatus| StreamName::parse(&s.stream).map(|n| n.kind);
        let last_of_kind = t
            .streams
            .get(at + 1)
            .is_none_or(|next| kind(next) != kind(s));
        if let Some(total) = t.totals.iter().filter(|_| last_of_kind).find(|x| {
            StreamName::parse(&s.stream).is_some_and(|n| x.streams.starts_with(n.kind.prefix()))
        }) {
            let num = |n: u64| (n.to_string(), if n == 0 { plain } else { Paint::yellow });
            rows.push(vec![
                (
                    format!("Σ {} ({} partitions)", total.streams, t.partitions),
                    Paint::bold,
                ),
                (total.length.to_string(), plain),
                (
                    total.dead_letters.to_string(),
                    if total.dead_letters == 0 {
                        plain
                    } else {
                        Paint::red
                    },
                ),
                (total.group.clone(), plain),
                total.lag.map_or(("?".into(), Paint::yellow), num),
                num(total.pending),
                (String::new(), plain),
                (String::new(), plain),
                (String::new(), plain),
            ]);
            notes.push(Vec::new());
        }
    }
    if !with_node {
        for r in &mut rows {
            r.pop();
        }
    }
    let ncols = rows[0].len();
    let widths: Vec<usize> = (0..ncols)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].0.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    // Numbers right-aligned.
    let right = [false, true, true, false, true, true, false, true, false];
    for (row, notes) in rows.iter().zip(&notes) {
        let mut line = String::from("  ");
        for (c, (text, style)) in row.iter().enumerate() {
            let pad = " ".repeat(widths[c] - text.chars().count());
            let styled = style(p, text);
            if right[c] {
                line.push_str(&pad);
                line.push_str(&styled);
            } else {
                line.push_str(&styled);
                if c + 1 < ncols {
                    line.push_str(&pad);
                }
            }
            if c + 1 < ncols {
                line.push_str("  ");
            }
        }
        let _ = writeln!(o, "{}", line.trim_end());
        for n in notes {
            let _ = writeln!(o, "{n}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(4_120), "4.1s");
        assert_eq!(human_ms(192_000), "3m12s");
        assert_eq!(human_ms(7_500_000), "2h05m");
        assert_eq!(human_ms(273_600_000), "3d04h");
    }

    #[test]
    fn plain_output_has_no_escape_codes_and_aligns() {
        let s = Status {
            time: "2026-11-23T10:00:00.000Z".into(),
            redis: RedisStatus {
                url: "redis://h".into(),
            },
            postgres: PostgresStatus {
                ok: false,
                error: Some("connection refused".into()),
            },
            tables: vec![TableStatus {
                table: "m".into(),
                dead_letters: 2,
                rows_last_minute: None,
                chunks: None,
                newest_archive: None,
                postgres_error: None,
                partitions: 1,
                totals: vec![],
                streams: vec![StreamStatus {
                    stream: "telemetry:{m}".into(),
                    partition: 0,
                    removed: false,
                    node: None,
                    exists: true,
                    length: 12345,
                    dlq: "telemetry:{m}:dlq".into(),
                    dead_letters: 2,
                    groups: vec![GroupStatus {
                        group: "ingest".into(),
                        exists: true,
                        lag: Some(3),
                        pending: 1,
                        last_delivered_id: None,
                        oldest_pending: None,
                        consumers: vec![],
                    }],
                }],
            }],
        };
        let text = render(&s, Paint { color: false });
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("unreachable: connection refused"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.contains("STREAM")).unwrap();
        // Right-aligned LENGTH: the number ends where the header ends.
        let end = lines[header].find("LENGTH").unwrap() + "LENGTH".len();
        assert_eq!(&lines[header + 1][end - 5..end], "12345");
        let coloured = render(&s, Paint { color: true });
        assert!(coloured.contains("\x1b[31m2 dead letters\x1b[0m"));
    }
}
