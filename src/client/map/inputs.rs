//! The paths `batchctl map` reads, in order: those named on the command line, a list read from stdin
//! (one a line, or NUL-separated), and with `-r` the regular files below named directories, walked
//! depth first in name order. Blocking I/O: it runs off the async runtime.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::FileType;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Where the paths come from.
pub struct MapInputs {
    /// Paths as named; `-` reads the list at that place. Empty: the list alone.
    pub paths: Vec<PathBuf>,
    /// The list of paths (stdin), read lazily.
    pub list: Option<Box<dyn Read + Send>>,
    /// The list is NUL-separated (`-0`), else one path a line.
    pub null: bool,
    /// Walk directories (`-r`).
    pub recursive: bool,
    /// Follow symbolic links met while walking (`--follow`).
    pub follow: bool,
}

impl std::fmt::Debug for MapInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapInputs")
            .field("paths", &self.paths)
            .field("list", &self.list.is_some())
            .field("null", &self.null)
            .field("recursive", &self.recursive)
            .field("follow", &self.follow)
            .finish()
    }
}

/// One input met.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// A file to map (its kind is checked when it is opened).
    File(PathBuf),
    /// Something named or met that cannot be mapped, and why.
    Unreadable(PathBuf, String),
}

/// What [`Walker::next`] gives.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Found(Found),
    /// Reading the list would block (only when asked not to block).
    WouldBlock,
    End,
}

/// A directory being walked: its entries not yet visited, last first.
struct Dir {
    path: PathBuf,
    entries: Vec<(OsString, FileType)>,
    /// Device and inode, to stop a `--follow` loop.
    id: (u64, u64),
}

/// Yields the inputs one by one.
pub(super) struct Walker {
    args: VecDeque<PathBuf>,
    list: Option<BufReader<Box<dyn Read + Send>>>,
    reading_list: bool,
    sep: u8,
    recursive: bool,
    follow: bool,
    stack: Vec<Dir>,
}

// === impl Walker ===

impl Walker {
    pub(super) fn new(inputs: MapInputs) -> Self {
        let mut args: VecDeque<PathBuf> = inputs.paths.into();
        if args.is_empty() {
            args.push_back(PathBuf::from("-"));
        }
        Self {
            args,
            list: inputs.list.map(BufReader::new),
            reading_list: false,
            sep: if inputs.null { 0 } else { b'\n' },
            recursive: inputs.recursive,
            follow: inputs.follow,
            stack: Vec::new(),
        }
    }

    /// The next input. Reading the list blocks only when `may_block`.
    pub(super) fn next(&mut self, may_block: bool) -> Next {
        loop {
            if let Some(found) = self.walk_step() {
                return Next::Found(found);
            }
            if !self.stack.is_empty() {
                continue;
            }
            let path = if self.reading_list {
                match self.list_entry(may_block) {
                    Ok(Some(path)) => path,
                    Ok(None) => {
                        self.reading_list = false;
                        continue;
                    }
                    Err(Next::WouldBlock) => return Next::WouldBlock,
                    Err(other) => return other,
                }
            } else {
                match self.args.pop_front() {
                    Some(p) if p.as_os_str() == "-" => {
                        self.reading_list = true;
                        continue;
                    }
                    Some(p) => p,
                    None => return Next::End,
                }
            };
            if !self.recursive {
                return Next::Found(Found::File(path));
            }
            // Named paths are followed when they are links, like `find -H`.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => match read_dir(&path, (m.dev(), m.ino())) {
                    Ok(dir) => self.stack.push(dir),
                    Err(e) => return Next::Found(e),
                },
                _ => return Next::Found(Found::File(path)),
            }
        }
    }

    /// The next entry of the directory walk, descending as it goes; `None` when the walk is over
    /// (or a directory was entered: call again).
    fn walk_step(&mut self) -> Option<Found> {
        loop {
            let dir = self.stack.last_mut()?;
            let Some((name, kind)) = dir.entries.pop() else {
                self.stack.pop();
                continue;
            };
            let path = dir.path.join(&name);
            if kind.is_file() {
                return Some(Found::File(path));
            }
            let meta = if kind.is_dir() {
                std::fs::symlink_metadata(&path)
            } else if kind.is_symlink() && self.follow {
                std::fs::metadata(&path)
            } else {
                // Sockets, devices, pipes; links unless --follow.
                continue;
            };
            let meta = match meta {
                Ok(m) => m,
                Err(e) => return Some(Found::Unreadable(path, format!("cannot read: {e}"))),
            };
            if meta.is_file() {
                return Some(Found::File(path));
            }
            if !meta.is_dir() {
                continue;
            }
            let id = (meta.dev(), meta.ino());
            if self.stack.iter().any(|d| d.id == id) {
                let reason = "a link to a directory that contains it; not walked again".into();
                return Some(Found::Unreadable(path, reason));
            }
            match read_dir(&path, id) {
                Ok(dir) => self.stack.push(dir),
                Err(e) => return Some(e),
            }
            return None;
        }
    }

    /// The next path of the list: `Ok(None)` at its end, `Err(WouldBlock)` when it has nothing
    /// buffered and may not block, `Err(Found(..))` when it cannot be read.
    fn list_entry(&mut self, may_block: bool) -> Result<Option<PathBuf>, Next> {
        let Some(list) = &mut self.list else {
            return Ok(None);
        };
        loop {
            if !may_block && list.buffer().is_empty() {
                return Err(Next::WouldBlock);
            }
            let mut entry = Vec::new();
            match list.read_until(self.sep, &mut entry) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    if entry.last() == Some(&self.sep) {
                        entry.pop();
                    }
                    if entry.is_empty() {
                        continue;
                    }
                    return Ok(Some(PathBuf::from(OsString::from_vec(entry))));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.list = None;
                    let reason = format!("cannot read the list of paths: {e}");
                    return Err(Next::Found(Found::Unreadable("stdin".into(), reason)));
                }
            }
        }
    }
}

/// A directory's entries, sorted by name (so runs number files alike).
fn read_dir(path: &std::path::Path, id: (u64, u64)) -> Result<Dir, Found> {
    let unreadable = |e: std::io::Error| {
        Found::Unreadable(path.to_owned(), format!("cannot read the directory: {e}"))
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let kind = entry.file_type().map_err(unreadable)?;
        entries.push((entry.file_name(), kind));
    }
    // Popped from the end: last name first here, first name out.
    entries.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(Dir {
        path: path.to_owned(),
        entries,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(inputs: MapInputs) -> Vec<Found> {
        let mut w = Walker::new(inputs);
        let mut out = Vec::new();
        loop {
            match w.next(true) {
                Next::Found(f) => out.push(f),
                Next::End => return out,
                Next::WouldBlock => panic!("blocked while allowed to block"),
            }
        }
    }

    fn inputs(paths: &[&str], list: Option<&'static [u8]>, null: bool) -> MapInputs {
        MapInputs {
            paths: paths.iter().map(PathBuf::from).collect(),
            list: list.map(|l| Box::new(l) as Box<dyn Read + Send>),
            null,
            recursive: false,
            follow: false,
        }
    }

    fn file(p: &str) -> Found {
        Found::File(PathBuf::from(p))
    }

    #[test]
    fn the_list_is_read_in_place_of_a_dash_or_alone() {
        assert_eq!(
            collect(inputs(&[], Some(b"a b\n\nc\n"), false)),
            [file("a b"), file("c")]
        );
        assert_eq!(
            collect(inputs(&["x", "-", "y"], Some(b"new\nline\0sp ace\0"), true)),
            [file("x"), file("new\nline"), file("sp ace"), file("y")]
        );
        assert_eq!(collect(inputs(&["x"], None, false)), [file("x")]);
    }

    #[test]
    fn a_list_without_buffered_data_would_block() {
        let mut w = Walker::new(inputs(&[], Some(b"a\nb\n"), false));
        // Nothing is buffered before the first read.
        assert_eq!(w.next(false), Next::WouldBlock);
        assert_eq!(w.next(true), Next::Found(file("a")));
        assert_eq!(w.next(false), Next::Found(file("b")));
    }

    #[test]
    fn walks_regular_files_in_name_order_and_follows_links_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        for f in ["a.txt", "b/z", "b/c/y", "d"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("b/link")).unwrap();
        std::os::unix::fs::symlink(root, root.join("b/c/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("gone"), root.join("b/dangling")).unwrap();
        let walk = |follow: bool| {
            let mut i = inputs(&[root.to_str().unwrap()], None, false);
            i.recursive = true;
            i.follow = follow;
            collect(i)
                .into_iter()
                .map(|f| match f {
                    Found::File(p) => p.strip_prefix(root).unwrap().display().to_string(),
                    Found::Unreadable(p, why) => {
                        format!("!{} {why}", p.strip_prefix(root).unwrap().display())
                    }
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(walk(false), ["a.txt", "b/c/y", "b/z", "d"]);
        let followed = walk(true);
        assert_eq!(
            followed[..2],
            [
                "a.txt".to_owned(),
                "!b/c/loop a link to a directory that contains it; not walked again".to_owned()
            ]
        );
        assert_eq!(followed[2], "b/c/y");
        assert!(
            followed[3].starts_with("!b/dangling cannot read: "),
            "{followed:?}"
        );
        assert_eq!(
            followed[4..],
            ["b/link".to_owned(), "b/z".to_owned(), "d".to_owned()]
        );
    }
}
