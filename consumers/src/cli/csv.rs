//! RFC 4180 CSV, read and written by the import and report commands.
//!
//! Guarantee: every record read keeps the line it starts on, every field is
//! returned exactly as written (quotes removed, `""` unescaped, nothing trimmed
//! or converted), and any malformed input is an error naming its line and
//! column; what `row` writes reads back to the same fields.

use std::borrow::Cow;

/// One record: the (1-based) line it starts on and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub line: usize,
    pub fields: Vec<String>,
}

/// A syntax error: line and (1-based, in fields) column where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses a whole CSV text (a leading UTF-8 BOM is skipped; LF or CRLF line
/// ends). Blank lines between records are skipped.
pub fn parse(text: &str) -> Result<Vec<Record>, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    loop {
        // Skip blank lines.
        while let Some(&c) = chars.peek() {
            match c {
                '\n' => {
                    line += 1;
                    chars.next();
                }
                '\r' => {
                    chars.next();
                }
                _ => break,
            }
        }
        if chars.peek().is_none() {
            return Ok(records);
        }
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false; // inside quotes
        let mut was_quoted = false; // this field started with a quote
        loop {
            let err = |line, message: &str, fields: &[String]| SyntaxError {
                line,
                column: fields.len() + 1,
                message: message.to_string(),
            };
            match chars.next() {
                None if quoted => {
                    return Err(err(
                        start,
                        "a quoted field is not closed before the end of the file",
                        &fields,
                    ))
                }
                None => {
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some('"') if quoted => {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        quoted = false;
                    }
                }
                Some('"') if field.is_empty() && !was_quoted => {
                    quoted = true;
                    was_quoted = true;
                }
                Some('"') => return Err(err(
                    line,
                    "a quote inside an unquoted field (quote the whole field and double the quote)",
                    &fields,
                )),
                Some(c) if quoted => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
                Some(',') => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some('\n') => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some(c) if was_quoted => {
                    return Err(err(
                        line,
                        &format!("unexpected {c:?} after the closing quote of a field"),
                        &fields,
                    ))
                }
                Some(c) => field.push(c),
            }
        }
        records.push(Record {
            line: start,
            fields,
        });
    }
}

/// A field as written to CSV: quoted when it holds a comma, quote or line end.
pub fn field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

/// One record as a CSV line (with its `\n`).
pub fn row<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = fields
        .iter()
        .map(|f| field(f.as_ref()).into_owned())
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quotes_line_ends_and_keeps_lines() {
        let text = "\u{feff}a,b,c\r\n1,\"x, \"\"y\"\"\",\n\n\"multi\nline\",2,3\nlast,,";
        let recs = parse(text).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].fields, ["a", "b", "c"]);
        assert_eq!(
            (recs[1].line, recs[1].fields.clone()),
            (2, vec!["1".into(), "x, \"y\"".into(), String::new()])
        );
        assert_eq!(recs[2].line, 4);
        assert_eq!(recs[2].fields[0], "multi\nline");
        assert_eq!((recs[3].line, recs[3].fields.len()), (6, 3));
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("a,b\n1,x\"y\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 2));
        let e = parse("a,b\n1,\"open\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 2));
        let e = parse("a,b\n\"1\"x,2\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 1));
    }

    #[test]
    fn written_rows_read_back() {
        let fields = ["plain", "com,ma", "quo\"te", "new\nline", ""];
        let text = row(&fields);
        let back = parse(&text).unwrap();
        assert_eq!(back[0].fields, fields);
    }
}
