//! Name validation at the peers' boundaries: the blocker's object names and the mapper's volume
//! names refuse traversal, NUL, overlong names and the file blocker's reserved suffixes, and a
//! refused name leaves nothing behind: no object on any backend (`ARCHIP_TEST_BACKEND`), and on
//! files nothing on disk outside the objects directory either.

mod common;

use peers::blocker::{BlockerError, LockOwner, ObjectName};
use peers::mapper::{CreateOptions, Mapper, MapperError};

fn bad_names() -> Vec<String> {
    vec![
        String::new(),
        "..".into(),
        "../escape".into(),
        "a/../../escape".into(),
        "/etc/passwd".into(),
        "sub/dir".into(),
        "nul\0byte".into(),
        ".hidden".into(),
        "-option".into(),
        "x.tmp".into(),
        "x.lock".into(),
        "map-01.lock".into(),
        "white space".into(),
        "new\nline".into(),
        "caf\u{e9}".into(),
        "a".repeat(201),
    ]
}

#[test]
fn object_names_are_refused_at_the_blocker_boundary() {
    for name in bad_names() {
        match ObjectName::new(name.clone()) {
            Err(BlockerError::InvalidName { reason, .. }) => assert!(!reason.is_empty()),
            other => panic!("{name:?} was accepted: {other:?}"),
        }
    }
    assert!(ObjectName::new("a".repeat(200)).is_ok());
}

#[tokio::test]
async fn volume_names_are_refused_by_every_mapper_entry_point() {
    let backend = common::TestBackend::fresh("names");
    // On files: what is beside the backend's directory, which a traversal would add to.
    let beside = || {
        backend.objects_dir().map(|objects| {
            let root = objects.parent().unwrap().to_path_buf();
            let mut names: Vec<_> = std::fs::read_dir(root.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            (root, names)
        })
    };
    let before = beside();
    let b = backend.open();
    let m = Mapper::new(b.clone(), LockOwner::new("n1").unwrap());
    m.create("good", 1 << 20, CreateOptions::default())
        .await
        .unwrap();
    let objects_before = b.list("").await.unwrap();
    let mut names = bad_names();
    names.push("a".repeat(129));
    names.push("_underscore-first".into());
    for name in &names {
        let refused = |r: Result<(), MapperError>| {
            assert!(
                matches!(r, Err(MapperError::InvalidName(_))),
                "{name:?}: {r:?}"
            )
        };
        refused(
            m.create(name, 1 << 20, CreateOptions::default())
                .await
                .map(|_| ()),
        );
        refused(m.open(name).await.map(|_| ()));
        refused(m.map_write(name, 0, 1).await.map(|_| ()));
        refused(m.map_read(name, 0, 1).await.map(|_| ()));
        refused(m.snapshot("good", name).await.map(|_| ()));
        refused(m.snapshot(name, "ok-snap").await.map(|_| ()));
        refused(m.clone_volume("good", name, None).await.map(|_| ()));
        refused(m.resize(name, 2 << 20).await.map(|_| ()));
        refused(m.delete(name).await);
        refused(m.break_lock(name).await.map(|_| ()));
        refused(m.import(name, 0, &[1]).await.map(|_| ()));
        refused(m.dedup(name).await.map(|_| ()));
    }
    assert_eq!(m.list().await.unwrap().len(), 1, "nothing was created");
    let names = |v: Vec<peers::blocker::ObjectInfo>| {
        let mut n: Vec<String> = v.into_iter().map(|o| o.name.to_string()).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(b.list("").await.unwrap()),
        names(objects_before),
        "no object was written"
    );
    // A temporary directory's siblings are other tests' (they come and go): what matters is
    // that no name a refused volume would have made appeared beside it.
    if let (Some((root, before)), Some((_, after))) = (before, beside()) {
        let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
        assert!(
            new.iter().all(|n| n.to_string_lossy().starts_with(".tmp")),
            "nothing escaped the directory: {new:?}"
        );
        for entry in std::fs::read_dir(&root).unwrap() {
            assert_eq!(entry.unwrap().file_name(), "objects");
        }
    }
    assert!(
        LockOwner::new("../n").is_err() && LockOwner::new("n\0").is_err(),
        "lock owners are names too"
    );
}
