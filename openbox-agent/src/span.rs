//! Spans in the in-process SDK's JSON format (not written yet).
