//! The test environment: Debian packages and a Python virtualenv.

use anyhow::Result;

pub struct TestEnv {
    vars: Vec<(String, String)>,
}

impl TestEnv {
    pub fn vars(&self) -> Vec<(String, String)> {
        self.vars.clone()
    }
}

pub fn setup() -> Result<TestEnv> {
    Ok(TestEnv { vars: Vec::new() })
}
