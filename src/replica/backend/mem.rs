//! An in-memory backend for tests of the layers above: objects in a map, and a switch that
//! makes every operation fail with a chosen error (a backend that is down, or refuses).

use super::{check_name, keep_listed, split_prefix, Backend, BackendError};
use parking_lot::Mutex;
use std::collections::BTreeMap;

#[derive(Default)]
pub struct MemBackend {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    failure: Mutex<Option<BackendError>>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on every operation fails with `e` (`None`: works again).
    pub fn set_failure(&self, e: Option<BackendError>) {
        *self.failure.lock() = e;
    }

    /// How many objects are stored.
    pub fn len(&self) -> usize {
        self.objects.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, name: Option<&str>) -> Result<(), BackendError> {
        if let Some(e) = self.failure.lock().clone() {
            return Err(e);
        }
        name.map_or(Ok(()), check_name)
    }
}

impl Backend for MemBackend {
    fn describe(&self) -> String {
        "mem:".to_string()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.check(Some(name))?;
        self.objects.lock().insert(name.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        self.check(Some(name))?;
        self.objects
            .lock()
            .get(name)
            .cloned()
            .ok_or(BackendError::NotFound)
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        self.check(Some(name))?;
        Ok(self.objects.lock().contains_key(name))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.check(None)?;
        split_prefix(prefix)?;
        let objects = self.objects.lock();
        Ok(objects
            .keys()
            .filter(|n| keep_listed("mem:", n, prefix))
            .cloned()
            .collect())
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.check(Some(name))?;
        self.objects.lock().remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_failure_switch() {
        let b = MemBackend::new();
        b.put("a/b", b"x").unwrap();
        assert_eq!(b.get("a/b").unwrap(), b"x");
        assert_eq!(b.get("a/c"), Err(BackendError::NotFound));
        assert_eq!(b.list("a/").unwrap(), vec!["a/b".to_string()]);
        assert!(b.put("../x", b"").is_err());
        b.set_failure(Some(BackendError::Transient("down".into())));
        assert!(b.get("a/b").unwrap_err().is_transient());
        b.set_failure(None);
        b.delete("a/b").unwrap();
        b.delete("a/b").unwrap();
        assert!(b.is_empty());
    }
}
