//! Helpers shared by the storage crate's test binaries.

use std::path::Path;

/// Copies a directory tree (a closed data dir, or a live vault's
/// write-ahead segments) file by file.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's dir");
    for item in std::fs::read_dir(from).expect("read the dir") {
        let item = item.expect("dir entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("file type").is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy a file");
        }
    }
}
