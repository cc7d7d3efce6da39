"""Training: loss, optimizer and the sharded steps (`train`), the pretraining loop
(`trainer`), checkpoints (`checkpoint`), multi-process start-up and lost peers
(`distributed`, `peers`), the host allocator (`host`) and the metrics log
(`metrics_file`).

Import the modules themselves (`from pldr_jax.training import trainer`); this
package re-exports nothing, so every name has one home."""
