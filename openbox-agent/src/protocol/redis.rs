//! Redis RESP2/RESP3 parser. (Not written yet.)

use super::{Op, Parser, ParserConfig, Protocol, Side};

/// Whether these first bytes can start this protocol.
pub fn looks_like_command(_first: &[u8]) -> bool {
    false
}

pub struct RedisParser {
    _cfg: ParserConfig,
    unparsed: u64,
}

impl RedisParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            _cfg: cfg,
            unparsed: 0,
        }
    }
}

impl Parser for RedisParser {
    fn protocol(&self) -> Protocol {
        Protocol::Redis
    }
    fn feed(&mut self, _side: Side, _data: &[u8], _ts: u64, _out: &mut Vec<Op>) {}
    fn gap(&mut self, _side: Side, _n: u64, _ts: u64, _out: &mut Vec<Op>) {}
    fn close(&mut self, _ts: u64, _out: &mut Vec<Op>) {}
    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}
