//! Tar entry names: normalization for lookups and the safety rules for names in a layer.

/// Normalizes a path for lookups: `./a/b`, `a/b`, `/a/b` and `a//b/` all become `a/b`; the root
/// (`./`, `/`, ``) becomes the empty string. Bytes need not be UTF-8.
pub fn normalize(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    for part in name.split(|&b| b == b'/') {
        if part.is_empty() || part == b"." {
            continue;
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    out
}

/// Rejects names that could escape the layer root: absolute paths, `..` components, NUL bytes.
pub fn check_entry_name(name: &[u8]) -> Result<(), String> {
    if name.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if name.contains(&0) {
        return Err("NUL byte in name".into());
    }
    if name.split(|&b| b == b'/').any(|p| p == b"..") {
        return Err("`..` component".into());
    }
    Ok(())
}

/// The parent directory of a normalized path and the last component.
pub fn split_parent(norm: &[u8]) -> (&[u8], &[u8]) {
    match norm.iter().rposition(|&b| b == b'/') {
        Some(i) => (&norm[..i], &norm[i + 1..]),
        None => (&[], norm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_equivalent_spellings() {
        for s in ["./a/b", "a/b", "/a/b", "a//b/", "./a/./b"] {
            assert_eq!(normalize(s.as_bytes()), b"a/b", "{s}");
        }
        assert_eq!(normalize(b"./"), b"");
        assert_eq!(normalize(b"caf\xe9"), b"caf\xe9");
    }

    #[test]
    fn rejects_escaping_names() {
        assert!(check_entry_name(b"../etc/passwd").is_err());
        assert!(check_entry_name(b"a/../../b").is_err());
        assert!(check_entry_name(b"/etc/passwd").is_err());
        assert!(check_entry_name(b"a\0b").is_err());
        assert!(check_entry_name(b"./a/..b/c..").is_ok());
        assert!(check_entry_name(b"./").is_ok());
    }

    #[test]
    fn splits_parent() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
    }
}
