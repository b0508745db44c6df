//! Small helpers for structured WGSL generation: named pieces and unrolled statements, never
//! substring replacement in a template.

use std::fmt::Write;

/// A growing WGSL source with indentation.
pub struct Wgsl {
    out: String,
    indent: usize,
}

impl Wgsl {
    pub fn new(header: &str) -> Self {
        let mut w = Wgsl {
            out: String::new(),
            indent: 0,
        };
        for line in header.lines() {
            w.line(&format!("// {line}"));
        }
        w
    }
    /// Appends one line at the current indentation.
    pub fn line(&mut self, s: &str) {
        let _ = writeln!(self.out, "{:w$}{s}", "", w = self.indent * 4);
    }
    /// Appends verbatim text (library code shared by all specializations).
    pub fn raw(&mut self, s: &str) {
        self.out.push_str(s);
        if !s.ends_with('\n') {
            self.out.push('\n');
        }
    }
    /// Appends lines of text, each at the current indentation.
    pub fn raw_indented(&mut self, s: &str) {
        for line in s.lines() {
            self.line(line);
        }
    }
    /// Opens a block: the line, then one more level of indentation.
    pub fn open(&mut self, s: &str) {
        self.line(s);
        self.indent += 1;
    }
    /// Closes a block opened with [`Wgsl::open`].
    pub fn close(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("}");
    }
    /// One more level of indentation without a line (after verbatim text that opened a block).
    pub fn indent_in(&mut self) {
        self.indent += 1;
    }
    pub fn finish(self) -> String {
        self.out
    }
}
