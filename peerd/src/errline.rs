//! The one-line error the binaries print.

/// `error: cause: cause`, leaving out a cause whose text the line already
/// ends with. Many errors put their source in their own message (`origin X:
/// {source}`) and also report it as the source; anyhow's `{:#}` would then
/// print it twice.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.ends_with(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("origin /x: {source}")]
    struct Wrapped {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Wrapped { source: io });
        assert_eq!(one_line(&e), "origin /x: no such file");
        let e = e.context("starting the root");
        assert_eq!(one_line(&e), "starting the root: origin /x: no such file");
    }
}
