//! The boundary to durable storage. The broker core keeps everything in memory;
//! persistence in sled plugs in here without the model or protocol knowing how.
