//! The Go-template subset Secretless users write in `generic_http` `headers` and
//! `queryParams` values.
//!
//! Secretless renders those values with Go's `text/template` over the service's
//! credentials (a `map[string]string`) plus one function of its own, `base64` (standard
//! alphabet, padded). What its users and its own connectors write is a small subset:
//!
//! ```text
//! Bearer {{ .token }}
//! token {{ .api_key }}
//! Basic {{ printf "%s:%s" .username .password | base64 }}
//! {{ .x | base64 }}    {{.x}}    {{- .x -}}    {{ .access_token }}
//! ```
//!
//! This module parses exactly that subset, by hand, when the configuration loads:
//!
//! * text outside actions is copied as written (a lone `}}` included);
//! * `{{- ` and ` -}}` trim the spaces, tabs, CRs and LFs before and after the action, as
//!   in Go (the marker needs its space: `{{-.x}}` is an error, as in Go);
//! * `{{/* comment */}}` (also `{{- /* comment */ -}}`) renders nothing;
//! * an action is a pipeline, commands separated by `|`: the value of each command is
//!   passed as the *last* argument of the next one (`{{ .a | printf "%s-%s" .b }}` is
//!   `printf "%s-%s" .b .a`);
//! * operands: `.name` (a credential), `"string"` with Go's escapes (`\n \t \" \\ \x41
//!   \101 \u00e9 \U0001F600` ...), `` `raw string` ``, and `( pipeline )`;
//! * functions: `printf` with a string-literal format whose verbs are `%s`, `%v` (the
//!   same thing for strings) and `%%`, and `base64`.
//!
//! Anything else Go would accept (`if`, `range`, `with`, `$x`, numbers, `index`,
//! `urlquery`, `.a.b`, ...) is a parse error naming it and its byte offset. Where Go would
//! quietly render something surprising, this is an error instead, always on the safe
//! side:
//!
//! * a variable the credentials lack is an error naming it (Go prints `<no value>`);
//! * a `printf` whose argument count does not match its verbs is a parse error (Go prints
//!   `%!s(MISSING)`, or `%!(EXTRA string=...)` with the extra *value* in it);
//! * a rendered value containing CR, LF or NUL is an error
//!   ([`TemplateError::ControlCharacter`]): a header must not be split. Text the template
//!   itself would render with one of them is rejected at parse time; through `base64`
//!   they are harmless and allowed.
//!
//! Values are bytes, as Go strings are: they need not be UTF-8. The rendered value and
//! every intermediate buffer are zeroized when dropped, and are allocated at their exact
//! final size so that no reallocation leaves a copy behind. No error message carries a
//! credential's value; template text is configuration, not a secret, and may appear.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use zeroize::Zeroizing;

/// A parsed template.
#[derive(Clone)]
pub struct Template {
    src: String,
    /// The variables read, deduplicated, in order of first appearance;
    /// [`Expr::Field`] indexes this.
    names: Vec<String>,
    nodes: Vec<Node>,
}

#[derive(Clone)]
enum Node {
    Text(String),
    Action(Expr),
}

#[derive(Clone)]
enum Expr {
    /// `.name`: an index into [`Template::names`].
    Field(usize),
    /// A string literal (template text, not a secret).
    Literal(Vec<u8>),
    /// `printf`; the parser checked that `args` has one entry per [`Piece::Arg`].
    Printf {
        pieces: Vec<Piece>,
        args: Vec<Expr>,
    },
    Base64(Box<Expr>),
}

#[derive(Clone)]
enum Piece {
    Text(Vec<u8>),
    /// `%s` or `%v`: the next argument.
    Arg,
}

/// What is wrong with a template, or with the values it was rendered with.
///
/// Offsets are byte offsets into the template's source text. No message contains a
/// variable's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` (at `offset`) with no `}}` after it.
    #[error("byte {offset}: `{{{{` is never closed by `}}}}`")]
    Unclosed { offset: usize },
    /// Go template syntax this broker does not implement (`what`: e.g. "`if`").
    #[error(
        "byte {offset}: {what} is not supported (supported: `.name`, \"strings\", \
         `printf` with %s, `base64`, pipes `|`, trim markers `{{{{- ` and ` -}}}}`)"
    )]
    Unsupported { offset: usize, what: String },
    /// A function other than `printf` and `base64`.
    #[error("byte {offset}: unknown function `{name}` (supported: printf, base64)")]
    UnknownFunction { offset: usize, name: String },
    /// `base64` given other than one argument (a value piped in counts).
    #[error("byte {offset}: `base64` takes one argument, got {got}")]
    Base64Args { offset: usize, got: usize },
    /// A `printf` whose arguments after the format do not match its `%s` verbs.
    #[error(
        "byte {offset}: the printf format has {verbs} %s verb(s) but {args} argument(s) \
         follow it (a value piped in with `|` is the last argument)"
    )]
    PrintfArgs {
        offset: usize,
        verbs: usize,
        args: usize,
    },
    /// An invalid escape in a string literal (`offset`: its backslash).
    #[error("byte {offset}: bad escape sequence {what} in a string literal")]
    BadEscape { offset: usize, what: String },
    /// Any other syntax error.
    #[error("byte {offset}: {message}")]
    Syntax { offset: usize, message: String },
    /// Text of the template itself would put a CR, LF or NUL into every rendered value.
    #[error(
        "byte {offset}: the template's own text renders a CR, LF or NUL, which a header \
         cannot hold (trim line breaks with `{{{{- ` and ` -}}}}`)"
    )]
    TextControlCharacter { offset: usize },
    /// The template reads a variable the credentials do not have.
    #[error("no value for variable `{name}`")]
    MissingVariable { name: String },
    /// The value of variable `name` would put a CR, LF or NUL into the rendered text,
    /// which could split a header.
    #[error(
        "the value of `{name}` contains a CR, LF or NUL that would reach the rendered text \
         (a header could be split)"
    )]
    ControlCharacter { name: String },
}

impl Template {
    /// Parse at config load; the error names the position and what is wrong.
    pub fn parse(src: &str) -> Result<Self, TemplateError> {
        let mut p = Parser {
            src,
            pos: 0,
            open: 0,
            depth: 0,
            names: Vec::new(),
        };
        let mut nodes = Vec::new();
        let mut trim_leading = false;
        loop {
            let open = src[p.pos..].find("{{").map(|i| p.pos + i);
            let left_trim = open.is_some_and(|o| has_left_trim_marker(&src[o + 2..]));
            let (mut start, mut end) = (p.pos, open.unwrap_or(src.len()));
            if trim_leading {
                start = end - src[start..end].trim_start_matches(is_go_space).len();
            }
            if left_trim {
                end = start + src[start..end].trim_end_matches(is_go_space).len();
            }
            if start < end {
                if let Some(i) = src.as_bytes()[start..end].iter().position(|&b| is_ctrl(b)) {
                    return Err(TemplateError::TextControlCharacter { offset: start + i });
                }
                nodes.push(Node::Text(src[start..end].to_owned()));
            }
            let Some(open) = open else { break };
            p.open = open;
            // Like Go, skip the marker and exactly one space after it.
            p.pos = open + if left_trim { 4 } else { 2 };
            let (expr, trim) = p.action()?;
            if let Some(expr) = expr {
                if expr.renders_literal_control() {
                    return Err(TemplateError::TextControlCharacter { offset: open });
                }
                nodes.push(Node::Action(expr));
            }
            trim_leading = trim;
        }
        Ok(Template {
            src: src.to_owned(),
            names: p.names,
            nodes,
        })
    }

    /// The variable names the template reads (`.token` -> "token"), deduplicated, in order.
    pub fn names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// Render with `vars` (name -> value bytes; `None`: missing -> error naming the
    /// variable). The result holds secrets: it is zeroized when dropped, as is every
    /// intermediate buffer.
    pub fn render<'v>(
        &self,
        vars: &dyn Fn(&str) -> Option<&'v [u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, TemplateError> {
        let values = self
            .names
            .iter()
            .map(|name| {
                vars(name).ok_or_else(|| TemplateError::MissingVariable { name: name.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for node in &self.nodes {
            if let Node::Action(expr) = node
                && let Some(i) = expr.control_source(&values)
            {
                return Err(TemplateError::ControlCharacter {
                    name: self.names[i].clone(),
                });
            }
        }
        let len = self
            .nodes
            .iter()
            .map(|node| match node {
                Node::Text(text) => text.len(),
                Node::Action(expr) => expr.len(&values),
            })
            .sum();
        // Exactly the final size: nothing below reallocates, so no copy is left behind.
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        for node in &self.nodes {
            match node {
                Node::Text(text) => out.extend_from_slice(text.as_bytes()),
                Node::Action(expr) => expr.write(&values, &mut out),
            }
        }
        debug_assert_eq!(out.len(), len);
        // Unreachable by construction (the parser rejects literal CR/LF/NUL that would be
        // rendered, base64 output is plain ASCII, values were checked above); kept so that
        // no later change can split a header silently.
        if out.iter().any(|&b| is_ctrl(b)) {
            return Err(TemplateError::ControlCharacter {
                name: self.names.first().cloned().unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Template").field(&self.src).finish()
    }
}

impl Expr {
    /// Whether the template's own text (a literal not under `base64`) reaches the output
    /// with a CR, LF or NUL.
    fn renders_literal_control(&self) -> bool {
        match self {
            Expr::Field(_) | Expr::Base64(_) => false,
            Expr::Literal(bytes) => bytes.iter().any(|&b| is_ctrl(b)),
            Expr::Printf { pieces, args } => {
                pieces
                    .iter()
                    .any(|p| matches!(p, Piece::Text(t) if t.iter().any(|&b| is_ctrl(b))))
                    || args.iter().any(Expr::renders_literal_control)
            }
        }
    }

    /// The first variable whose value reaches the output (not under `base64`) with a CR,
    /// LF or NUL.
    fn control_source(&self, values: &[&[u8]]) -> Option<usize> {
        match self {
            Expr::Field(i) => values[*i].iter().any(|&b| is_ctrl(b)).then_some(*i),
            Expr::Literal(_) | Expr::Base64(_) => None,
            Expr::Printf { args, .. } => args.iter().find_map(|a| a.control_source(values)),
        }
    }

    /// The exact length of the rendered bytes.
    fn len(&self, values: &[&[u8]]) -> usize {
        match self {
            Expr::Field(i) => values[*i].len(),
            Expr::Literal(bytes) => bytes.len(),
            Expr::Printf { pieces, args } => {
                let text: usize = pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => t.len(),
                        Piece::Arg => 0,
                    })
                    .sum();
                text + args.iter().map(|a| a.len(values)).sum::<usize>()
            }
            Expr::Base64(inner) => inner.len(values).div_ceil(3) * 4,
        }
    }

    /// Appends the rendered bytes; `out` has room for them (see [`Expr::len`]).
    fn write(&self, values: &[&[u8]], out: &mut Vec<u8>) {
        match self {
            Expr::Field(i) => out.extend_from_slice(values[*i]),
            Expr::Literal(bytes) => out.extend_from_slice(bytes),
            Expr::Printf { pieces, args } => {
                let mut args = args.iter();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.extend_from_slice(t),
                        Piece::Arg => {
                            if let Some(arg) = args.next() {
                                arg.write(values, out);
                            }
                        }
                    }
                }
            }
            Expr::Base64(inner) => match **inner {
                Expr::Field(i) => base64_into(values[i], out),
                Expr::Literal(ref bytes) => base64_into(bytes, out),
                _ => {
                    let mut buf = Zeroizing::new(Vec::with_capacity(inner.len(values)));
                    inner.write(values, &mut buf);
                    base64_into(&buf, out);
                }
            },
        }
    }
}

/// Appends the standard, padded base64 encoding of `input` to `out`.
fn base64_into(input: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + input.len().div_ceil(3) * 4, 0);
    let written = B64
        .encode_slice(input, &mut out[start..])
        .expect("the buffer is sized for the padded encoding");
    debug_assert_eq!(start + written, out.len());
}

/// Go's template whitespace.
fn is_go_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// The bytes a rendered header value must not contain.
fn is_ctrl(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | 0)
}

/// `rest` (what follows `{{`) starts with a left trim marker: `-` and a space.
fn has_left_trim_marker(rest: &str) -> bool {
    let mut chars = rest.chars();
    chars.next() == Some('-') && chars.next().is_some_and(is_go_space)
}

/// The length of the identifier at the start of `s` (letters, digits, `_`).
fn ident_len(s: &str) -> usize {
    s.char_indices()
        .find(|&(_, c)| !(c == '_' || c.is_alphanumeric()))
        .map_or(s.len(), |(i, _)| i)
}

/// Go's template keywords and constants: none is supported.
const KEYWORDS: &[&str] = &[
    "block", "break", "continue", "define", "else", "end", "if", "range", "template", "with",
    "nil", "true", "false",
];

#[derive(Clone, Copy)]
enum Func {
    Printf,
    Base64,
}

enum Kind<'s> {
    Field(&'s str),
    Ident(&'s str),
    Str(Vec<u8>),
    Pipe,
    Open,
    Close,
    End { trim: bool },
}

struct Tok<'s> {
    kind: Kind<'s>,
    offset: usize,
}

/// How a pipeline ended.
enum Term {
    /// `}}`, or ` -}}` (`trim`).
    End { trim: bool },
    /// `)` at `offset`.
    Close { offset: usize },
}

struct Parser<'s> {
    src: &'s str,
    pos: usize,
    /// The `{{` of the action being parsed.
    open: usize,
    /// How many `(` enclose the current position.
    depth: usize,
    names: Vec<String>,
}

/// The deepest nesting of parentheses accepted (the parser recurses on them).
const MAX_DEPTH: usize = 16;

fn syntax(offset: usize, message: impl Into<String>) -> TemplateError {
    TemplateError::Syntax {
        offset,
        message: message.into(),
    }
}

fn unsupported(offset: usize, what: impl Into<String>) -> TemplateError {
    TemplateError::Unsupported {
        offset,
        what: what.into(),
    }
}

impl<'s> Parser<'s> {
    fn rest(&self) -> &'s str {
        &self.src[self.pos..]
    }

    /// One action, after its `{{` (and trim marker): its expression (none for a comment)
    /// and whether it ends with a trim marker.
    fn action(&mut self) -> Result<(Option<Expr>, bool), TemplateError> {
        if self.rest().starts_with("/*") {
            let Some(close) = self.rest()[2..].find("*/") else {
                return Err(syntax(self.pos, "unclosed comment: `/*` without `*/`"));
            };
            self.pos += 2 + close + 2;
            let rest = self.rest();
            if rest.starts_with("}}") {
                self.pos += 2;
                return Ok((None, false));
            }
            let mut chars = rest.chars();
            if chars.next().is_some_and(is_go_space) && chars.as_str().starts_with("-}}") {
                self.pos += 4;
                return Ok((None, true));
            }
            return Err(syntax(
                self.pos,
                "a comment must end right before `}}` (or ` -}}`)",
            ));
        }
        match self.pipeline()? {
            (expr, Term::End { trim }) => Ok((Some(expr), trim)),
            (_, Term::Close { offset }) => Err(syntax(offset, "`)` without a matching `(`")),
        }
    }

    /// `command ('|' command)*`, up to `}}` or `)`.
    fn pipeline(&mut self) -> Result<(Expr, Term), TemplateError> {
        let mut piped = None;
        loop {
            let (expr, next) = self.command(piped.take())?;
            match next.kind {
                Kind::Pipe => piped = Some(expr),
                Kind::End { trim } => return Ok((expr, Term::End { trim })),
                Kind::Close => {
                    return Ok((
                        expr,
                        Term::Close {
                            offset: next.offset,
                        },
                    ));
                }
                _ => unreachable!("a command ends at `|`, `)` or `}}`"),
            }
        }
    }

    /// One command, given the value piped into it; returns it and the token that ended it
    /// (`|`, `)` or `}}`).
    fn command(&mut self, piped: Option<Expr>) -> Result<(Expr, Tok<'s>), TemplateError> {
        let tok = self.next()?;
        match tok.kind {
            Kind::Ident(name) => {
                let func = self.function(name, tok.offset)?;
                let mut args = Vec::new();
                let next = loop {
                    let t = self.next()?;
                    if matches!(t.kind, Kind::Pipe | Kind::Close | Kind::End { .. }) {
                        break t;
                    }
                    args.push((t.offset, self.operand(t)?));
                };
                if let Some(p) = piped {
                    args.push((tok.offset, p));
                }
                Ok((call(func, args, tok.offset)?, next))
            }
            Kind::Pipe | Kind::Close | Kind::End { .. } => Err(syntax(
                tok.offset,
                match (&piped, &tok.kind) {
                    (Some(_), _) => "missing function after `|`",
                    (None, Kind::Pipe) => "missing value before `|`",
                    (None, Kind::Close) => "empty parentheses",
                    (None, _) => "empty action",
                },
            )),
            _ => {
                let offset = tok.offset;
                let expr = self.operand(tok)?;
                let next = self.next()?;
                if !matches!(next.kind, Kind::Pipe | Kind::Close | Kind::End { .. }) {
                    return Err(syntax(
                        offset,
                        "a value is not a function: it cannot take arguments \
                         (functions: printf, base64)",
                    ));
                }
                if piped.is_some() {
                    return Err(syntax(
                        offset,
                        "a value cannot receive a piped value: only a function \
                         (printf, base64) can",
                    ));
                }
                Ok((expr, next))
            }
        }
    }

    /// An argument: `.name`, a string or `( pipeline )`.
    fn operand(&mut self, tok: Tok<'s>) -> Result<Expr, TemplateError> {
        match tok.kind {
            Kind::Field(name) => Ok(Expr::Field(self.intern(name))),
            Kind::Str(bytes) => Ok(Expr::Literal(bytes)),
            Kind::Open => {
                if self.depth == MAX_DEPTH {
                    return Err(unsupported(
                        tok.offset,
                        format!("nesting parentheses more than {MAX_DEPTH} deep"),
                    ));
                }
                self.depth += 1;
                let (expr, term) = self.pipeline()?;
                self.depth -= 1;
                match term {
                    Term::Close { .. } => Ok(expr),
                    Term::End { .. } => Err(syntax(tok.offset, "`(` is never closed by `)`")),
                }
            }
            Kind::Ident(name) => {
                self.function(name, tok.offset)?;
                Err(syntax(
                    tok.offset,
                    format!("function `{name}` as an argument: write `({name} ...)`"),
                ))
            }
            Kind::Pipe | Kind::Close | Kind::End { .. } => {
                unreachable!("the caller handles terminators")
            }
        }
    }

    fn function(&self, name: &str, offset: usize) -> Result<Func, TemplateError> {
        match name {
            "printf" => Ok(Func::Printf),
            "base64" => Ok(Func::Base64),
            k if KEYWORDS.contains(&k) => Err(unsupported(offset, format!("`{k}`"))),
            _ => Err(TemplateError::UnknownFunction {
                offset,
                name: name.to_owned(),
            }),
        }
    }

    fn intern(&mut self, name: &str) -> usize {
        match self.names.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.names.push(name.to_owned());
                self.names.len() - 1
            }
        }
    }

    /// The next token inside an action, skipping whitespace.
    fn next(&mut self) -> Result<Tok<'s>, TemplateError> {
        self.pos = self.src.len() - self.rest().trim_start_matches(is_go_space).len();
        // Whitespace before the token: skipped just now, or the left trim marker's.
        let spaced = self.pos > 0 && is_go_space(char::from(self.src.as_bytes()[self.pos - 1]));
        let rest = self.rest();
        let offset = self.pos;
        let tok = |kind| Ok(Tok { kind, offset });
        let Some(c) = rest.chars().next() else {
            return Err(TemplateError::Unclosed { offset: self.open });
        };
        if rest.starts_with("}}") {
            self.pos += 2;
            return tok(Kind::End { trim: false });
        }
        if spaced && rest.starts_with("-}}") {
            self.pos += 3;
            return tok(Kind::End { trim: true });
        }
        match c {
            '|' | '(' | ')' => {
                self.pos += 1;
                tok(match c {
                    '|' => Kind::Pipe,
                    '(' => Kind::Open,
                    _ => Kind::Close,
                })
            }
            '"' => {
                let bytes = self.quoted()?;
                tok(Kind::Str(bytes))
            }
            '`' => {
                let Some(len) = rest[1..].find('`') else {
                    return Err(syntax(offset, "unterminated raw string literal"));
                };
                self.pos += len + 2;
                // As Go's strconv.Unquote: carriage returns are dropped from raw strings.
                let bytes = rest[1..1 + len].bytes().filter(|&b| b != b'\r').collect();
                tok(Kind::Str(bytes))
            }
            '.' => {
                let after = &rest[1..];
                if after.starts_with(|c: char| c.is_ascii_digit()) {
                    return Err(unsupported(offset, "number literals"));
                }
                let len = ident_len(after);
                if len == 0 {
                    return Err(unsupported(
                        offset,
                        "`.` on its own (the whole set of credentials)",
                    ));
                }
                let name = &after[..len];
                self.pos += 1 + len;
                if self.rest().starts_with('.') && ident_len(&self.rest()[1..]) > 0 {
                    return Err(unsupported(
                        offset,
                        format!("the chained field `.{name}.…` (credentials are flat)"),
                    ));
                }
                tok(Kind::Field(name))
            }
            c if c == '_' || c.is_alphabetic() => {
                let len = ident_len(rest);
                self.pos += len;
                tok(Kind::Ident(&rest[..len]))
            }
            '-' if offset == self.open + 2 => Err(syntax(
                offset,
                "a left trim marker needs a space after it: `{{- `",
            )),
            '-' if rest[1..].starts_with("}}") => Err(syntax(
                offset,
                "a right trim marker needs a space before it: ` -}}`",
            )),
            '$' => Err(unsupported(offset, "template variables (`$`)")),
            '0'..='9' | '-' | '+' => Err(unsupported(offset, "number literals")),
            '\'' => Err(unsupported(offset, "character literals (`'x'`)")),
            ':' | '=' => Err(unsupported(offset, "assignments (`:=`, `=`)")),
            '/' if rest.starts_with("/*") => Err(syntax(
                offset,
                "a comment must start right after `{{` (or `{{- `)",
            )),
            _ => Err(syntax(offset, format!("unexpected character {c:?}"))),
        }
    }

    /// A double-quoted string literal at `self.pos`, with Go's escapes.
    fn quoted(&mut self) -> Result<Vec<u8>, TemplateError> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let mut out = Vec::new();
        let mut i = start + 1;
        loop {
            match bytes.get(i) {
                None | Some(b'\n') => {
                    return Err(syntax(start, "unterminated string literal"));
                }
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(out);
                }
                Some(b'\\') => i = self.escape(start, i, &mut out)?,
                Some(&b) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
    }

    /// The escape whose backslash is at `at` (in the string starting at `start`): appends
    /// what it stands for and returns the index after it.
    fn escape(&self, start: usize, at: usize, out: &mut Vec<u8>) -> Result<usize, TemplateError> {
        let Some(c) = self.src[at + 1..].chars().next().filter(|&c| c != '\n') else {
            return Err(syntax(start, "unterminated string literal"));
        };
        let simple = match c {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '"' => Some(b'"'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(at + 2);
        }
        let bad = |what: String| TemplateError::BadEscape { offset: at, what };
        let (digits_at, count, radix) = match c {
            'x' => (at + 2, 2, 16),
            'u' => (at + 2, 4, 16),
            'U' => (at + 2, 8, 16),
            '0'..='7' => (at + 1, 3, 8),
            _ => return Err(bad(format!("`\\{c}`"))),
        };
        let digits = self
            .src
            .get(digits_at..digits_at + count)
            .filter(|d| d.chars().all(|d| d.is_digit(radix)));
        let Some(digits) = digits else {
            return Err(bad(match c {
                '0'..='7' => "`\\` with octal digits (it needs exactly 3)".to_owned(),
                _ => format!("`\\{c}` (it needs exactly {count} hex digits)"),
            }));
        };
        let value =
            u32::from_str_radix(digits, radix).map_err(|_| bad(format!("`\\{c}{digits}`")))?;
        match c {
            'u' | 'U' => {
                let ch = char::from_u32(value)
                    .ok_or_else(|| bad(format!("`\\{c}{digits}` (not a Unicode scalar value)")))?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
            }
            _ => {
                let byte = u8::try_from(value)
                    .map_err(|_| bad(format!("`\\{digits}` (octal value above 255)")))?;
                out.push(byte);
            }
        }
        Ok(digits_at + count)
    }
}

/// Builds a function call, checking its arguments (`offset`: the function's name).
fn call(func: Func, args: Vec<(usize, Expr)>, offset: usize) -> Result<Expr, TemplateError> {
    match func {
        Func::Base64 => {
            let got = args.len();
            match <[_; 1]>::try_from(args) {
                Ok([(_, arg)]) => Ok(Expr::Base64(Box::new(arg))),
                Err(_) => Err(TemplateError::Base64Args { offset, got }),
            }
        }
        Func::Printf => {
            let mut args = args.into_iter();
            let Some((format_at, format)) = args.next() else {
                return Err(syntax(offset, "`printf` needs a format string"));
            };
            let Expr::Literal(format) = format else {
                return Err(unsupported(
                    format_at,
                    "a printf format that is not a string literal",
                ));
            };
            let (pieces, verbs) = parse_format(&format, format_at)?;
            let args: Vec<Expr> = args.map(|(_, a)| a).collect();
            if args.len() != verbs {
                return Err(TemplateError::PrintfArgs {
                    offset,
                    verbs,
                    args: args.len(),
                });
            }
            Ok(Expr::Printf { pieces, args })
        }
    }
}

/// Splits a printf format into text and `%s`/`%v` slots; returns them and the slot count.
fn parse_format(format: &[u8], offset: usize) -> Result<(Vec<Piece>, usize), TemplateError> {
    let mut pieces = Vec::new();
    let mut text = Vec::new();
    let mut verbs = 0;
    let mut i = 0;
    while i < format.len() {
        if format[i] != b'%' {
            text.push(format[i]);
            i += 1;
            continue;
        }
        match format.get(i + 1) {
            Some(b's' | b'v') => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Arg);
                verbs += 1;
            }
            Some(b'%') => text.push(b'%'),
            None => {
                return Err(unsupported(
                    offset,
                    "a lone `%` at the end of a printf format",
                ));
            }
            Some(_) => {
                let end = format[i + 1..]
                    .iter()
                    .position(u8::is_ascii_alphabetic)
                    .map_or(format.len(), |p| i + 2 + p);
                let verb = String::from_utf8_lossy(&format[i..end]);
                return Err(unsupported(
                    offset,
                    format!("the printf verb `{verb}` (only %s, %v and %% are)"),
                ));
            }
        }
        i += 2;
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok((pieces, verbs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    fn render(src: &str, pairs: &[(&str, &str)]) -> Result<String, TemplateError> {
        let out = Template::parse(src)?.render(&vars(pairs))?;
        Ok(String::from_utf8(out.to_vec()).expect("UTF-8 in these tests"))
    }

    fn ok(src: &str, pairs: &[(&str, &str)]) -> String {
        render(src, pairs).unwrap_or_else(|e| panic!("{src:?}: {e}"))
    }

    fn parse_err(src: &str) -> TemplateError {
        match Template::parse(src) {
            Ok(t) => panic!("{src:?} parsed: {t:?}"),
            Err(e) => e,
        }
    }

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    // The forms users write.

    #[test]
    fn bearer_token() {
        assert_eq!(ok("Bearer {{ .token }}", &[("token", "t0k")]), "Bearer t0k");
    }

    #[test]
    fn token_prefix() {
        assert_eq!(ok("token {{ .api_key }}", &[("api_key", "k")]), "token k");
    }

    #[test]
    fn basic_printf_base64_matches_secretless_test_vector() {
        // Secretless' own config_test.go: Jonah / secret.
        let src = r#"Basic {{ printf "%s:%s" .username .password | base64 }}"#;
        let pairs = [("username", "Jonah"), ("password", "secret")];
        assert_eq!(ok(src, &pairs), "Basic Sm9uYWg6c2VjcmV0");
    }

    #[test]
    fn pipe_into_base64() {
        assert_eq!(ok("{{ .x | base64 }}", &[("x", "hello")]), b64("hello"));
        assert_eq!(ok("{{ base64 .x }}", &[("x", "hello")]), b64("hello"));
        // Padding for every length modulo 3.
        for s in ["", "a", "ab", "abc", "abcd"] {
            assert_eq!(ok("{{ .x | base64 }}", &[("x", s)]), b64(s));
        }
    }

    #[test]
    fn no_spaces_inside_braces() {
        assert_eq!(ok("{{.x}}", &[("x", "v")]), "v");
        assert_eq!(ok("{{.x|base64}}", &[("x", "v")]), b64("v"));
        assert_eq!(
            ok(
                r#"{{printf "%s:%s" .a .b|base64}}"#,
                &[("a", "1"), ("b", "2")]
            ),
            b64("1:2")
        );
    }

    #[test]
    fn trim_markers() {
        assert_eq!(ok("a  {{- .x -}}  b", &[("x", "X")]), "aXb");
        assert_eq!(ok("a \t\r\n{{- .x }} b", &[("x", "X")]), "aX b");
        assert_eq!(ok("a {{ .x -}} \n\t b", &[("x", "X")]), "a Xb");
        assert_eq!(ok("{{- .x -}}", &[("x", "X")]), "X");
        assert_eq!(ok("\n  {{- .x -}}\n", &[("x", "X")]), "X");
        // Go's own example, `{{23 -}} < {{- 45}}`, with fields.
        assert_eq!(
            ok("{{.a -}} < {{- .b}}", &[("a", "23"), ("b", "45")]),
            "23<45"
        );
        // Several spaces before `-}}`, tabs after `{{-`.
        assert_eq!(ok("a {{-\t.x   -}} b", &[("x", "X")]), "aXb");
        // A trimmed text between two actions disappears.
        assert_eq!(
            ok("{{ .a -}}  \n  {{- .b }}", &[("a", "1"), ("b", "2")]),
            "12"
        );
    }

    #[test]
    fn multi_line_yaml_block_with_trim_markers() {
        let src = "\n  {{- printf \"%s:%s\"\n      .user\n      .pass\n    | base64 -}}\n";
        assert_eq!(ok(src, &[("user", "u"), ("pass", "p")]), b64("u:p"));
    }

    #[test]
    fn literal_text_around_and_between_actions() {
        assert_eq!(
            ok("pre {{ .a }} mid {{ .b }} post", &[("a", "A"), ("b", "B")]),
            "pre A mid B post"
        );
        assert_eq!(ok("no actions at all", &[]), "no actions at all");
        assert_eq!(ok("", &[]), "");
        assert_eq!(ok("a }} b {", &[]), "a }} b {");
        assert_eq!(ok("{{ .a }}{{ .a }}", &[("a", "x")]), "xx");
    }

    #[test]
    fn oauth2_access_token() {
        let src = "Bearer {{ .access_token }}";
        let t = Template::parse(src).expect("parses");
        assert_eq!(t.names(), ["access_token"]);
        assert_eq!(ok(src, &[("access_token", "eyJ.x.y")]), "Bearer eyJ.x.y");
    }

    // Secretless' documentation and tests.

    #[test]
    fn secretless_doc_examples() {
        // generic/README.md: X-ApiKey header.
        assert_eq!(ok("{{ .apikey }}", &[("apikey", "ABC123")]), "ABC123");
        // generic/README.md: basic auth through generic_http, and its query parameter.
        let basic = "Basic {{ printf \"%s:%s\" .username .password | base64 }}";
        let pairs = [("username", "someuser"), ("password", "somepassword")];
        assert_eq!(
            ok(basic, &pairs),
            format!("Basic {}", b64("someuser:somepassword"))
        );
        assert_eq!(ok("{{ .address }}", &[("address", "here")]), "here");
        // generic/README.md: oauth1 values.
        for key in ["consumer_key", "consumer_secret", "token", "token_secret"] {
            assert_eq!(ok(&format!("{{{{ .{key} }}}}"), &[(key, "v")]), "v");
        }
        // generic/config_test.go.
        let pairs = [("username", "Jonah"), ("password", "secret")];
        assert_eq!(ok("{{ .username }}", &pairs), "Jonah");
        assert_eq!(
            ok("{{ .username }} - {{ .password }}", &pairs),
            "Jonah - secret"
        );
    }

    // More of the subset.

    #[test]
    fn names_are_deduplicated_in_order() {
        let t = Template::parse(
            r#"{{ printf "%s %s %s" .b .a .b }} {{ .c | base64 }} {{ (printf "%s" .a) }}"#,
        )
        .expect("parses");
        assert_eq!(t.names(), ["b", "a", "c"]);
        assert!(Template::parse("plain").expect("parses").names().is_empty());
    }

    #[test]
    fn pipe_passes_the_value_as_last_argument() {
        let pairs = [("a", "A"), ("b", "B")];
        assert_eq!(ok(r#"{{ .a | printf "%s-%s" .b }}"#, &pairs), "B-A");
        assert_eq!(ok(r#"{{ "lit" | printf "<%s>" }}"#, &pairs), "<lit>");
        assert_eq!(ok("{{ .a | base64 | base64 }}", &pairs), b64(&b64("A")));
    }

    #[test]
    fn parentheses() {
        let pairs = [("u", "user"), ("p", "pass")];
        assert_eq!(
            ok(r#"{{ base64 (printf "%s:%s" .u .p) }}"#, &pairs),
            b64("user:pass")
        );
        assert_eq!(
            ok(r#"{{ printf "%s/%s" (.u | base64) .p }}"#, &pairs),
            format!("{}/pass", b64("user"))
        );
        assert_eq!(ok("{{ (.u) }}", &pairs), "user");
        let nested = format!("{{{{ {}.u{} }}}}", "(".repeat(16), ")".repeat(16));
        assert_eq!(ok(&nested, &pairs), "user");
        let too_deep = format!("{{{{ {}.u{} }}}}", "(".repeat(17), ")".repeat(17));
        assert!(
            matches!(
                parse_err(&too_deep),
                TemplateError::Unsupported { offset: 19, .. }
            ),
            "{:?}",
            parse_err(&too_deep)
        );
    }

    #[test]
    fn printf_verbs() {
        let pairs = [("a", "A")];
        assert_eq!(ok(r#"{{ printf "%v|%s" .a .a }}"#, &pairs), "A|A");
        assert_eq!(ok(r#"{{ printf "100%% %s" .a }}"#, &pairs), "100% A");
        assert_eq!(ok(r#"{{ printf "constant" }}"#, &pairs), "constant");
        assert_eq!(ok(r#"{{ printf "%s%s" .a .a }}"#, &pairs), "AA");
    }

    #[test]
    fn string_literals_and_go_escapes() {
        let pairs = [("x", "X")];
        assert_eq!(ok(r#"{{ "lit" }}"#, &pairs), "lit");
        assert_eq!(
            ok(
                r#"{{ printf "%s\t\"q\"\\\x41\101\u00e9\U0001F600" .x }}"#,
                &pairs
            ),
            "X\t\"q\"\\AAé😀"
        );
        assert_eq!(ok(r#"{{ printf "\a\b\f\v" }}"#, &pairs), "\x07\x08\x0c\x0b");
        assert_eq!(ok("{{ printf `%s:\\n` .x }}", &pairs), "X:\\n");
        assert_eq!(ok(r#"{{ "}} {{ .x }}" }}"#, &pairs), "}} {{ .x }}");
        // A raw string may span lines; its CRs are dropped, as in Go.
        assert_eq!(ok("{{ `a\r\nb` | base64 }}", &pairs), b64("a\nb"));
    }

    #[test]
    fn comments() {
        assert_eq!(ok("a{{/* note */}}b", &[]), "ab");
        assert_eq!(ok("a {{- /* multi\nline */ -}} b", &[]), "ab");
        assert_eq!(ok("{{/* */}}{{ .x }}", &[("x", "v")]), "v");
    }

    #[test]
    fn unicode_field_names_and_bytes_that_are_not_utf8() {
        assert_eq!(ok("{{ .clé_1 }}", &[("clé_1", "v")]), "v");
        let t = Template::parse("<{{ .bin }}>").expect("parses");
        let value: &[u8] = &[0xff, 0xfe, b'\t', 0x80];
        let out = t.render(&|_| Some(value)).expect("renders");
        assert_eq!(&out[..], b"<\xff\xfe\t\x80>");
    }

    #[test]
    fn a_value_containing_braces_is_not_expanded() {
        let pairs = [("a", "{{ .b }}"), ("b", "SECRET-B")];
        assert_eq!(ok("x {{ .a }} y", &pairs), "x {{ .b }} y");
        assert_eq!(ok(r#"{{ printf "%s" .a }}"#, &pairs), "{{ .b }}");
    }

    #[test]
    fn render_can_borrow_from_a_map() {
        let map: std::collections::HashMap<String, Vec<u8>> =
            [("token".to_owned(), b"t".to_vec())].into();
        let t = Template::parse("Bearer {{ .token }}").expect("parses");
        let out = t
            .render(&|name| map.get(name).map(Vec::as_slice))
            .expect("renders");
        assert_eq!(&out[..], b"Bearer t");
    }

    #[test]
    fn debug_shows_the_source() {
        let t = Template::parse("Bearer {{ .token }}").expect("parses");
        assert_eq!(format!("{t:?}"), r#"Template("Bearer {{ .token }}")"#);
    }

    // Errors, with their positions.

    #[test]
    fn unclosed_action() {
        assert_eq!(
            parse_err("Bearer {{ .token"),
            TemplateError::Unclosed { offset: 7 }
        );
        assert_eq!(
            parse_err("{{ .a }} and {{"),
            TemplateError::Unclosed { offset: 13 }
        );
        assert_eq!(
            parse_err(r#"{{ printf "%s" .a | base64 "#),
            TemplateError::Unclosed { offset: 0 }
        );
        let e = parse_err("Bearer {{ .token");
        assert_eq!(e.to_string(), "byte 7: `{{` is never closed by `}}`");
    }

    #[test]
    fn unknown_function() {
        let e = parse_err("{{ .x | upper }}");
        assert_eq!(
            e,
            TemplateError::UnknownFunction {
                offset: 8,
                name: "upper".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "byte 8: unknown function `upper` (supported: printf, base64)"
        );
        // Go builtins other than printf are not implemented.
        for (src, name) in [
            (r#"{{ index . "k" }}"#, "index"),
            ("{{ .x | urlquery }}", "urlquery"),
            ("{{ print .x }}", "print"),
        ] {
            assert!(
                matches!(parse_err(src), TemplateError::UnknownFunction { name: n, .. } if n == name),
                "{src}"
            );
        }
    }

    #[test]
    fn keywords_are_unsupported() {
        let e = parse_err("a {{ if .x }}b{{ end }}");
        assert_eq!(
            e,
            TemplateError::Unsupported {
                offset: 5,
                what: "`if`".into()
            }
        );
        assert!(
            e.to_string().starts_with("byte 5: `if` is not supported"),
            "{e}"
        );
        for (src, offset, what) in [
            ("{{ range .x }}{{ end }}", 3, "`range`"),
            ("{{- with .x }}", 4, "`with`"),
            ("{{ define \"t\" }}", 3, "`define`"),
            ("{{ printf \"%s\" true }}", 15, "`true`"),
        ] {
            assert_eq!(
                parse_err(src),
                TemplateError::Unsupported {
                    offset,
                    what: what.into()
                },
                "{src}"
            );
        }
    }

    #[test]
    fn other_unsupported_syntax() {
        for (src, offset, what) in [
            ("{{ $x := .a }}", 3, "template variables"),
            ("{{ .a.b }}", 3, "chained field"),
            ("{{ . }}", 3, "`.` on its own"),
            ("{{ 42 }}", 3, "number literals"),
            ("{{ printf \"%s\" .5 }}", 15, "number literals"),
            ("{{ 'x' }}", 3, "character literals"),
            ("{{ printf \"%d\" .n }}", 10, "the printf verb `%d`"),
            ("{{ printf \"%-10s\" .n }}", 10, "the printf verb `%-10s`"),
            ("{{ printf \"%q\" .n }}", 10, "the printf verb `%q`"),
            ("{{ printf \"50%\" }}", 10, "a lone `%`"),
            ("{{ printf .fmt .a }}", 10, "not a string literal"),
        ] {
            match parse_err(src) {
                TemplateError::Unsupported { offset: o, what: w } => {
                    assert_eq!(o, offset, "{src}");
                    assert!(w.contains(what), "{src}: {w}");
                }
                e => panic!("{src}: {e:?}"),
            }
        }
    }

    #[test]
    fn printf_argument_count_mismatch() {
        assert_eq!(
            parse_err(r#"{{ printf "%s:%s" .u }}"#),
            TemplateError::PrintfArgs {
                offset: 3,
                verbs: 2,
                args: 1
            }
        );
        assert_eq!(
            parse_err(r#"{{ printf "%s" .u .p }}"#),
            TemplateError::PrintfArgs {
                offset: 3,
                verbs: 1,
                args: 2
            }
        );
        // The piped value counts as the last argument.
        assert_eq!(
            parse_err(r#"x {{ .u | printf "%s" .p }}"#),
            TemplateError::PrintfArgs {
                offset: 10,
                verbs: 1,
                args: 2
            }
        );
        assert_eq!(
            parse_err(r#"{{ printf "no verbs" .p }}"#),
            TemplateError::PrintfArgs {
                offset: 3,
                verbs: 0,
                args: 1
            }
        );
        let e = parse_err("{{ printf }}");
        assert!(
            matches!(e, TemplateError::Syntax { offset: 3, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn base64_argument_count() {
        assert_eq!(
            parse_err("{{ base64 }}"),
            TemplateError::Base64Args { offset: 3, got: 0 }
        );
        assert_eq!(
            parse_err("{{ base64 .a .b }}"),
            TemplateError::Base64Args { offset: 3, got: 2 }
        );
        assert_eq!(
            parse_err("{{ .a | base64 .b }}"),
            TemplateError::Base64Args { offset: 8, got: 2 }
        );
    }

    #[test]
    fn bad_escapes() {
        for (src, offset, what) in [
            (r#"{{ "a\qb" }}"#, 5, r"`\q`"),
            (r#"{{ "it\'s" }}"#, 6, r"`\'`"),
            (r#"{{ "\x4" }}"#, 4, "2 hex digits"),
            (r#"{{ "\xZZ" }}"#, 4, "2 hex digits"),
            (r#"{{ "\u12" }}"#, 4, "4 hex digits"),
            (r#"{{ "\ud800" }}"#, 4, "not a Unicode scalar value"),
            (r#"{{ "\U00110000" }}"#, 4, "not a Unicode scalar value"),
            (r#"{{ "\400" }}"#, 4, "above 255"),
            (r#"{{ "\12" }}"#, 4, "exactly 3"),
        ] {
            match parse_err(src) {
                TemplateError::BadEscape { offset: o, what: w } => {
                    assert_eq!(o, offset, "{src}");
                    assert!(w.contains(what), "{src}: {w}");
                }
                e => panic!("{src}: {e:?}"),
            }
        }
        let e = parse_err(r#"{{ "a\qb" }}"#);
        assert_eq!(
            e.to_string(),
            r"byte 5: bad escape sequence `\q` in a string literal"
        );
    }

    #[test]
    fn syntax_errors_with_positions() {
        for (src, offset, message) in [
            ("{{ }}", 3, "empty action"),
            ("{{- -}}", 4, "empty action"),
            ("{{ | base64 }}", 3, "missing value before `|`"),
            ("{{ .a | }}", 8, "missing function after `|`"),
            ("{{ .a .b }}", 3, "not a function"),
            ("{{ .a | .b }}", 8, "cannot receive a piped value"),
            (r#"{{ "s" | "t" }}"#, 9, "cannot receive a piped value"),
            ("{{ (base64 .a }}", 3, "`(` is never closed"),
            ("{{ .a ) }}", 6, "`)` without a matching `(`"),
            ("{{ () }}", 4, "empty parentheses"),
            (
                "{{ printf \"%s\" base64 .a }}",
                15,
                "function `base64` as an argument",
            ),
            ("{{ \"abc }}", 3, "unterminated string literal"),
            ("{{ \"ab\ncd\" }}", 3, "unterminated string literal"),
            ("{{ `abc }}", 3, "unterminated raw string literal"),
            ("{{ .x-}}", 5, "needs a space before it"),
            ("{{-.x }}", 2, "needs a space after it"),
            ("{{/* never closed }}", 2, "unclosed comment"),
            ("{{/* c */ .x }}", 9, "comment must end right before"),
            ("{{ .x /* c */ }}", 6, "comment must start right after"),
            ("{{ .x , .y }}", 6, "unexpected character ','"),
        ] {
            match parse_err(src) {
                TemplateError::Syntax {
                    offset: o,
                    message: m,
                } => {
                    assert_eq!(o, offset, "{src}: {m}");
                    assert!(m.contains(message), "{src}: {m}");
                }
                e => panic!("{src}: {e:?}"),
            }
        }
    }

    #[test]
    fn missing_variable() {
        let t = Template::parse(r#"{{ printf "%s:%s" .username .password | base64 }}"#)
            .expect("parses");
        let e = t.render(&vars(&[("username", "u")])).unwrap_err();
        assert_eq!(
            e,
            TemplateError::MissingVariable {
                name: "password".into()
            }
        );
        assert_eq!(e.to_string(), "no value for variable `password`");
    }

    // Header injection.

    #[test]
    fn control_characters_in_a_value_are_refused() {
        for value in ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b"] {
            for src in ["Bearer {{ .token }}", r#"{{ printf "<%s>" .token }}"#] {
                assert_eq!(
                    render(src, &[("token", value)]),
                    Err(TemplateError::ControlCharacter {
                        name: "token".into()
                    }),
                    "{src}"
                );
            }
        }
        // The error names the variable that carries it, not another one.
        assert_eq!(
            render("{{ .a }}{{ .b }}", &[("a", "fine"), ("b", "x\ny")]),
            Err(TemplateError::ControlCharacter { name: "b".into() })
        );
        assert_eq!(
            render("{{ .a | base64 }}{{ .b }}", &[("a", "x\ny"), ("b", "z\r")]),
            Err(TemplateError::ControlCharacter { name: "b".into() })
        );
        // Tabs and other bytes are fine; under base64 a line break is harmless.
        assert_eq!(ok("{{ .a }}", &[("a", "x\ty")]), "x\ty");
        assert_eq!(ok("{{ .a | base64 }}", &[("a", "x\r\ny")]), b64("x\r\ny"));
    }

    #[test]
    fn control_characters_in_the_template_text_are_refused_at_parse() {
        for (src, offset) in [
            ("Bearer {{ .token }}\n", 19),
            ("a\r\nb", 1),
            ("{{ .a }}\0", 8),
            ("x {{ \"\\n\" }}", 2),
            (r#"{{ printf "%s\r\n" .a }}"#, 0),
            (r#"{{ printf "%s" "\x00" }}"#, 0),
        ] {
            assert_eq!(
                parse_err(src),
                TemplateError::TextControlCharacter { offset },
                "{src:?}"
            );
        }
        // Trimmed away, or encoded, they are fine.
        assert_eq!(ok("Bearer {{ .token -}}\n", &[("token", "t")]), "Bearer t");
        assert_eq!(ok(r#"{{ "\n" | base64 }}"#, &[]), b64("\n"));
    }

    #[test]
    fn errors_never_contain_a_value() {
        let secret = "s3cr3t-VALUE";
        let with_newline = "s3cr3t-VALUE\r\nX-Injected: 1";
        let cases: [(&str, &[(&str, &str)]); 4] = [
            ("{{ .token }} {{ .other }}", &[("token", secret)]),
            ("{{ .token }}", &[("token", with_newline)]),
            (r#"{{ printf "%s" .token }}"#, &[("token", with_newline)]),
            (
                "{{ .a }}{{ .token }}",
                &[("a", secret), ("token", with_newline)],
            ),
        ];
        for (src, pairs) in cases {
            let e = render(src, pairs).expect_err(src);
            for text in [e.to_string(), format!("{e:?}")] {
                assert!(!text.contains("s3cr3t"), "{src}: {text}");
            }
        }
    }

    #[test]
    fn rendered_buffer_has_its_exact_size() {
        let t = Template::parse(r#"Basic {{ printf "%s:%s" .u .p | base64 }} {{ .u }}"#)
            .expect("parses");
        let out = t
            .render(&vars(&[("u", "user"), ("p", "pw")]))
            .expect("renders");
        assert_eq!(out.len(), "Basic ".len() + b64("user:pw").len() + 1 + 4);
        assert!(out.capacity() >= out.len());
    }
}
