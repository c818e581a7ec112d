//! Checkpoints: the stored state of a job, with a checked advance. (being written)
