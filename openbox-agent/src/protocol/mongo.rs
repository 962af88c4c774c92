//! MongoDB wire protocol (OP_MSG, OP_QUERY) parser. (Not written yet.)

use super::{Op, Parser, ParserConfig, Protocol, Side};

/// Whether these first bytes can start this protocol.
pub fn looks_like_message(_first: &[u8]) -> bool {
    false
}

pub struct MongoParser {
    _cfg: ParserConfig,
    unparsed: u64,
}

impl MongoParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self {
            _cfg: cfg,
            unparsed: 0,
        }
    }
}

impl Parser for MongoParser {
    fn protocol(&self) -> Protocol {
        Protocol::Mongo
    }
    fn feed(&mut self, _side: Side, _data: &[u8], _ts: u64, _out: &mut Vec<Op>) {}
    fn gap(&mut self, _side: Side, _n: u64, _ts: u64, _out: &mut Vec<Op>) {}
    fn close(&mut self, _ts: u64, _out: &mut Vec<Op>) {}
    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}
