//! The actix runtime: one actor per file, each thin. Actors receive a message,
//! ask the sans-IO core (`src/`) what to do, and do the IO.
//!
//! The actors themselves arrive with the data plane; this module is where the
//! crate mounts them (`#[path = "../actors/mod.rs"]` in `src/lib.rs`), so that
//! the architecture test can tell core from runtime by directory.
