//! HTTP/1.1 parser. (Not written yet.)

use super::{Op, Parser, ParserConfig, Protocol, Side};

/// Whether these first bytes can start this protocol.
pub fn looks_like_request(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];
    METHODS.iter().any(|m| first.starts_with(m))
}

pub struct HttpParser {
    _cfg: ParserConfig,
    unparsed: u64,
}

impl HttpParser {
    pub fn new(cfg: ParserConfig) -> Self {
        Self { _cfg: cfg, unparsed: 0 }
    }
}

impl Parser for HttpParser {
    fn protocol(&self) -> Protocol {
        Protocol::Http
    }
    fn feed(&mut self, _side: Side, _data: &[u8], _ts: u64, _out: &mut Vec<Op>) {}
    fn gap(&mut self, _side: Side, _n: u64, _ts: u64, _out: &mut Vec<Op>) {}
    fn close(&mut self, _ts: u64, _out: &mut Vec<Op>) {}
    fn unparsed(&self) -> u64 {
        self.unparsed
    }
}
