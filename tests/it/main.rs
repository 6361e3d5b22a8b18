//! Integration tests on real media: one binary (one link of the whole stack), one module per concern.

mod bad_inputs;
mod common;
mod crops;
#[cfg(feature = "mpi")]
mod dist;
mod fid;
mod hardening;
mod model;
mod nccl;
mod object_storage;
mod pillow_identity;
mod resume_and_shards;
mod sample;
mod scale;
mod sources;
mod tokens;
mod transforms;
mod video;
