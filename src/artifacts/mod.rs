//! Every artifact a stage writes and another reads, defined once: its
//! place on disk and its one typed reader and writer. A stage never
//! parses another stage's file by hand; an unreadable field is an error
//! naming the file and the key.
//!
//! - `cache`: the slice cache (cache.json, cases, the slice index), and
//!   the domain types it records (`Plane`, `PreprocessConfig`);
//! - `npy`: the cache's volumes and labels (.npy, memory-mapped);
//! - `embeddings`: embedding tables (safetensors).
//!
//! Three artifacts keep their one reader and writer beside the stage that
//! owns their meaning, because their records carry that stage's types:
//! captions.jsonl (`caption::store`: records with quality flags, the
//! append-only log and its compaction), run folders (`train::checkpoint`,
//! `train::metrics`) and export cards (`export::card`). Other stages read
//! them only through those typed readers.
pub mod cache;
pub mod embeddings;
pub mod npy;
