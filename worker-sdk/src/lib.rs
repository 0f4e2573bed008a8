//! Hare worker SDK: typed background workers over plain AMQP 0-9-1 (see the later issue).
