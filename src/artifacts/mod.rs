//! Every artifact a stage writes and another reads, defined once: its
//! place on disk and its one typed reader and writer. A stage never
//! parses another stage's file by hand; an unreadable field is an error
//! naming the file and the key.
//!
//! - `cache`: the slice cache (cache.json, cases, the slice index), and
//!   the domain types it records (`Plane`, `PreprocessConfig`);
//! - `npy`: the cache's volumes and labels (.npy, memory-mapped);
//! - `embeddings`: embedding tables (safetensors);
//! - `run`: pretraining run folders (run.json, checkpoints and their one
//!   reader, metrics, exports) and fine-tuning run folders;
//! - `events`: TensorBoard event files (the `tensorboard/` folder of both
//!   kinds of run folder).
//!
//! Three records keep their reader and writer beside the stage that owns
//! their meaning, because they carry that stage's types: captions.jsonl
//! (`caption::store`: records with quality flags, the append-only log and
//! its compaction), metrics lines (`train::metrics`, at the path
//! `run::metrics_jsonl` names) and export cards (`export::card`). Other
//! stages read them only through those typed readers.
pub mod cache;
pub mod embeddings;
pub mod events;
pub mod npy;
pub mod run;
