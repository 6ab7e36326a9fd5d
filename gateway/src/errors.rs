//! How an error is written for a person. A leaf: the CLI and `devices import` both use
//! it, so neither has to import the other for it.

/// An error with every cause of its source chain, `outer: inner: ...` (a reqwest error
/// alone says only "error sending request").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out = format!("{out}: {s}");
        source = s.source();
    }
    out
}
