//! The last lines of a command's output, kept for the error that reports its failure.

use std::collections::VecDeque;

/// Lines kept by default: enough to show an error and what led to it, small enough for a job
/// result.
pub const TAIL_LINES: usize = 50;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A bounded tail of output lines in arrival order.
///
/// Stdout and stderr reach an executor through separate pipes or chunks, so a script's last words
/// on stderr can arrive before much of its stdout. When the tail is full, stdout lines leave
/// first: the stderr line that explains a failure is not pushed out by chatter.
#[derive(Debug, Clone)]
pub struct OutputTail {
    limit: usize,
    lines: VecDeque<(Stream, String)>,
}

impl Default for OutputTail {
    fn default() -> Self {
        Self::new(TAIL_LINES)
    }
}

impl OutputTail {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            lines: VecDeque::with_capacity(limit.min(TAIL_LINES) + 1),
        }
    }

    pub fn push(&mut self, stream: Stream, line: impl Into<String>) {
        if self.lines.len() == self.limit {
            match self.lines.iter().position(|(s, _)| *s == Stream::Stdout) {
                Some(i) => {
                    self.lines.remove(i);
                }
                None => {
                    self.lines.pop_front();
                }
            }
        }
        self.lines.push_back((stream, line.into()));
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|(_, l)| l.as_str())
    }

    /// The last line kept, usually the tool's error message.
    pub fn last(&self) -> &str {
        self.lines.back().map_or("", |(_, l)| l.as_str())
    }

    /// The kept lines joined by newlines.
    pub fn text(&self) -> String {
        self.lines().collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_in_order() {
        let mut t = OutputTail::new(3);
        for i in 0..5 {
            t.push(Stream::Stdout, format!("l{i}"));
        }
        assert_eq!(t.text(), "l2\nl3\nl4");
        assert_eq!(t.last(), "l4");
    }

    #[test]
    fn stderr_outlives_stdout_that_arrived_after_it() {
        let mut t = OutputTail::new(3);
        t.push(Stream::Stdout, "a");
        t.push(Stream::Stderr, "fatal");
        for l in ["b", "c", "d"] {
            t.push(Stream::Stdout, l);
        }
        assert_eq!(t.lines().collect::<Vec<_>>(), vec!["fatal", "c", "d"]);
    }

    #[test]
    fn only_stderr_drops_the_oldest() {
        let mut t = OutputTail::new(2);
        for l in ["e1", "e2", "e3"] {
            t.push(Stream::Stderr, l);
        }
        assert_eq!(t.text(), "e2\ne3");
        assert_eq!(t.len(), 2);
    }
}
