//! whale-tensor (being written).
