//! Which images a folder holds and which caption file belongs to each.
//!
//! Images are `.jpg`, `.jpeg`, `.png` and `.webp` in any letter case, found recursively; names starting with
//! `.` (hidden files, `.ipynb_checkpoints`, `.git`) are passed over. An image `dir/x.png` takes its caption
//! from `dir/x.txt`, or else from `dir/x.caption`. Symlinks are followed, each real directory visited once,
//! so a link back up the tree cannot loop.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::CacheError;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
const CAPTION_EXTENSIONS: [&str; 2] = ["txt", "caption"];

/// One image and its caption file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The path under the images folder with `/` separators: what the manifest, the report and messages
    /// call the image, and what its id and its random draws derive from, so that they do not depend on
    /// where the folder is mounted.
    pub rel: String,
    pub image: PathBuf,
    pub caption: Option<PathBuf>,
}

impl Source {
    /// The item id: the path made safe for a file name on every store, plus a hash of the exact path, so
    /// that two paths that read the same once made safe (`a b.png`, `a_b.png`) stay two items.
    pub fn id(&self) -> String {
        let stem = self.rel.rsplit_once('.').map_or(self.rel.as_str(), |(stem, _)| stem);
        let safe: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
            .take(80)
            .collect();
        format!("{safe}-{}", &hex::encode(self.path_hash())[..8])
    }

    /// A digest of `rel`, the seed of the item's own random draws.
    pub fn path_hash(&self) -> [u8; 32] {
        Sha256::digest(self.rel.as_bytes()).into()
    }
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn caption_for(image: &Path) -> Option<PathBuf> {
    CAPTION_EXTENSIONS.iter().map(|ext| image.with_extension(ext)).find(|p| p.is_file())
}

/// The images under `dir` with their captions, sorted by path.
pub fn discover(dir: &Path) -> Result<Vec<Source>, CacheError> {
    let io = |path: &Path, e: std::io::Error| CacheError::Images {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if !dir.is_dir() {
        return Err(CacheError::Images { path: dir.display().to_string(), message: "not a directory".into() });
    }
    let mut found = Vec::new();
    let mut visited = HashSet::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        if !visited.insert(path.canonicalize().map_err(|e| io(&path, e))?) {
            continue;
        }
        for entry in std::fs::read_dir(&path).map_err(|e| io(&path, e))? {
            let entry = entry.map_err(|e| io(&path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let (child, child_rel) = (entry.path(), format!("{rel}{name}"));
            if child.is_dir() {
                pending.push((child, format!("{child_rel}/")));
            } else if child.is_file() && has_extension(&child, &IMAGE_EXTENSIONS) {
                found.push(Source { rel: child_rel, caption: caption_for(&child), image: child });
            }
        }
    }
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, rel: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn finds_images_in_any_case_and_pairs_captions() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for rel in [
            "a.png",
            "a.txt",
            "B.JPG",
            "B.caption",
            "sub/c.Jpeg",
            "sub/c.txt",
            "sub/c.caption",
            "sub/deeper/d.WebP",
            "e.gif",
            "notes.txt",
            "f.png.txt",
            ".hidden/g.png",
            ".h.png",
            "sub/x.bmp",
        ] {
            touch(d, rel);
        }
        let found = discover(d).unwrap();
        let got: Vec<(&str, Option<String>)> = found
            .iter()
            .map(|s| {
                let caption = s.caption.as_ref().map(|c| c.strip_prefix(d).unwrap().display().to_string());
                (s.rel.as_str(), caption)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("B.JPG", Some("B.caption".into())),
                ("a.png", Some("a.txt".into())),
                ("sub/c.Jpeg", Some("sub/c.txt".into())),
                ("sub/deeper/d.WebP", None),
            ]
        );
        assert_eq!(found[0].image, d.join("B.JPG"));
    }

    #[test]
    fn ids_are_safe_distinct_and_stable() {
        let source = |rel: &str| Source { rel: rel.into(), image: PathBuf::new(), caption: None };
        let (a, b) = (source("x/a b.png").id(), source("x/a_b.png").id());
        assert!(a.starts_with("x_a_b-") && b.starts_with("x_a_b-") && a != b, "{a} {b}");
        assert_ne!(source("a.png").id(), source("a.jpg").id());
        assert_eq!(source("ünï/Ça.webp").id(), source("ünï/Ça.webp").id());
        assert!(source("ünï/Ça.webp").id().chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_loop_is_visited_once() {
        let tmp = tempfile::tempdir().unwrap();
        touch(tmp.path(), "sub/a.png");
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("sub/up")).unwrap();
        let found = discover(tmp.path()).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(discover(&tmp.path().join("missing")).unwrap_err().to_string().contains("not a directory"));
    }
}
